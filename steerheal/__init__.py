"""steerheal: steer a persona into a model, distil it into LoRA, heal it with a KL barrier, repeat."""

__version__ = "0.1.0"


class SteerhealError(Exception):
    """A problem with the user's input: the CLI prints it as one line and exits 2.

    The message says what is wrong, where (file, line, key) and how to fix it.
    """
