"""icf — staged offline AVS pipeline and trainer implementing ICF (Zha et al. 2025)."""

__version__ = "0.1.0"
