"""The ``cliplab`` command: one ``*_cmd`` module per subcommand (argument parsing, printing) over
the library; no logic of its own that library code needs.

May import: anything in cliplab. Nothing in cliplab imports it.
"""
