"""``python -m models COMMAND [...]``: a small dispatcher over subcommands.

Each subcommand is one line of COMMANDS, ``"name": ("package.module:function", "one-line help")``,
where ``function(argv) -> int`` parses its own arguments and returns its exit code
(``models.cli_common.command``). A module is imported only when its command runs, so ``--help`` stays fast.
"""
from __future__ import annotations

import importlib
import sys

COMMANDS: dict[str, tuple[str, str]] = {
    "build-db": ("models.retrieval.cli:build_db_main", "build (or resume) a retrieval database from a corpus"),
    "query": ("models.retrieval.cli:query_main", "print the nearest database chunks of some text"),
    "db-info": ("models.retrieval.cli:info_main", "validate a retrieval database and print its summary"),
    "train": ("models.train:main", "train a RETRO model (or a plain decoder) on a database"),
    "retrofit": ("models.retrofit_train:main", "freeze a trained decoder (ours or a transformers one), add retrieval, train it"),
    "eval": ("models.evaluate:main", "bits per byte on held-out documents, retrieval ON and OFF"),
    "generate": ("models.generate:main", "sample from a model, retrieving as chunks complete"),
    "demo": ("models.demo:main", "end to end: database, training, bpb table, a sample"),
}


def _usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: python -m models COMMAND [options]   (python -m models COMMAND --help)", "", "commands:"]
    lines += [f"  {name.ljust(width)}  {help_}" for name, (_, help_) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"python -m models: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module_name, func_name = COMMANDS[name][0].split(":")
    func = getattr(importlib.import_module(module_name), func_name)
    return int(func(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
