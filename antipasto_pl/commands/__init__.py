"""The project subcommands of ``antipasto`` (next to Lightning's fit / validate / test / predict).

Each module holds one command as a plain typed function whose signature and docstring become its command line
(``antipasto_pl.cli`` registers them). Commands sit on top of the library: they may import any module, and no
library module imports them or the CLI.
"""
