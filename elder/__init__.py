"""ELDER: lifelong model editing with a mixture of LoRA (Li et al., AAAI-25)."""
