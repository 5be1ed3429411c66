"""The one exception type the CLI turns into a one-line message instead of a traceback."""


class UserError(Exception):
    """Bad input from the user: the message names the file or option and what to do."""


def one_line(message: str) -> str:
    """The user-facing line of an error message.

    An error raised inside a DataLoader worker reaches the main process re-raised with the
    worker's traceback as its message; the original message is its last line.
    """
    lines = [line for line in str(message).strip().splitlines() if line.strip()]
    if not lines:
        return ""
    if len(lines) > 1 and any(line.startswith("Original Traceback") for line in lines):
        last = lines[-1]
        return last.split(": ", 1)[1] if ": " in last else last
    return " ".join(line.strip() for line in lines)
