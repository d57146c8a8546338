"""ROME: rank-one model editing (Meng et al. 2022), the ELDER paper's locate-then-edit baseline."""
from baselines.rome.editor import ROMEConfig, ROMEEditor

__all__ = ["ROMEConfig", "ROMEEditor"]
