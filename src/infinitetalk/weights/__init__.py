"""Finding, reading and loading weight files (official layouts, no conversion by the user)."""
from .materialize import LazyStateDict, materialize, open_weights

__all__ = ["LazyStateDict", "materialize", "open_weights"]
