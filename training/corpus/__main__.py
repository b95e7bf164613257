"""``python -m training.corpus [--corpus.seed N ...]``: build (or load) the corpus and print its figures."""

from __future__ import annotations

import argparse
import sys

from training.config import ConfigError, add_dataclass_args, config_from_args
from training.corpus import CorpusConfig, MissingDataError, load_corpus


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.corpus", description=__doc__)
    add_dataclass_args(parser, CorpusConfig)
    try:
        config = config_from_args(CorpusConfig, parser.parse_args(argv))
        print(load_corpus(config).summary())
    except (ConfigError, ValueError, MissingDataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
