"""The one exception type users see: a message they can act on, never a traceback."""


class SelfsupError(Exception):
    """Bad input or a state the user can fix; the CLI prints the message and exits with code 2."""


class NonFiniteError(SelfsupError):
    """A loss or gradient went NaN/Inf; raised before the optimizer touches the weights."""
