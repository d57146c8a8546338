"""Edit-request data: typed requests and loaders for ZsRE and CounterFact."""
from data.requests import EditRequest

__all__ = ["EditRequest"]
