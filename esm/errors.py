"""The one exception type for bad user input: main.py prints it as one line, without a traceback."""


class UserError(ValueError):
  """Bad input from the user (a path, a file, a config field). The message names it and says what
  was expected; main.py prints it as a single line and exits non-zero."""
