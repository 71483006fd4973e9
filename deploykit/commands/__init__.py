"""Sub-commands of `deploykit` beyond `compress`, one module each with ``register(app)``.

Each module imports only typer at import time; the work is done by library functions it calls.
"""

COMMAND_MODULES = ("bench", "serve", "doctor", "engine")
