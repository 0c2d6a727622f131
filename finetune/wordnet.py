"""An offline WordNet for METEOR: nltk must never download at run time.

No PyPI package ships the WordNet database in a form nltk reads (the ones named for it are empty
shells that fetch at run time), so we read the WordNet 3.0 dictionary files that Debian's
`wordnet-base` package installs in /usr/share/wordnet (`apt-get install wordnet-base`), or any
WordNet 3.0 `dict/` directory named by JANUS_WORDNET. Debian leaves out `lexnames` (the table of
lexicographer files), which nltk insists on; we write it into a cache directory next to copies of
the other files (28 MB, once), deriving it from the `lexnames(5WN)` man page that the same package installs.
Without any of this METEOR is reported as unavailable, never silently zero.
"""
from __future__ import annotations

import gzip
import os
import re
import shutil
from functools import lru_cache
from pathlib import Path
from typing import Optional

DEBIAN_DICT = Path("/usr/share/wordnet")
DEBIAN_LEXNAMES_MAN = Path("/usr/share/man/man5/lexnames.5WN.gz")
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "janus-pretrain" / "wordnet"
NEEDED = ("data.noun", "index.noun", "data.verb", "index.verb", "verb.exc")
# lexnames' third column: the syntactic category of the lexicographer file.
CATEGORY = {"noun": 1, "verb": 2, "adj": 3, "adv": 4}


def _lexnames_from_man(man: Path) -> str:
    rows = re.findall(r"^(\d\d)\t(\w+)\.(\w+)\s", gzip.open(man, "rt").read(), re.M)
    return "".join(f"{num}\t{pos}.{name}\t{CATEGORY[pos]}\n" for num, pos, name in rows)


def _dict_dir() -> Optional[Path]:
    given = os.environ.get("JANUS_WORDNET")
    source = Path(given) if given else DEBIAN_DICT
    if not all((source / f).is_file() for f in NEEDED):
        return None
    if (source / "lexnames").is_file():
        return source
    if not DEBIAN_LEXNAMES_MAN.is_file():
        return None
    CACHE.mkdir(parents=True, exist_ok=True)
    for f in source.iterdir():  # the dictionary files; Debian's `wordnet` adds directories
        if f.is_file() and not (CACHE / f.name).exists():
            shutil.copyfile(f, CACHE / f.name)  # nltk refuses links that leave its root
    (CACHE / "lexnames").write_text(_lexnames_from_man(DEBIAN_LEXNAMES_MAN))
    return CACHE


@lru_cache(maxsize=1)
def wordnet():
    """nltk's WordNetCorpusReader over the offline dictionary, or None when there is none."""
    path = _dict_dir()
    if path is None:
        return None
    import nltk
    from nltk.corpus.reader.wordnet import WordNetCorpusReader

    class OfflineWordNet(WordNetCorpusReader):
        def map_wn(self, version="wordnet"):
            # nltk maps sense keys onto its own downloaded WordNet for the multilingual (OMW)
            # functions, which METEOR does not use: that lookup would want the download.
            return None

    # nltk only opens files under its data paths.
    if str(path) not in nltk.data.path:
        nltk.data.path.append(str(path))
    return OfflineWordNet(str(path), None)


UNAVAILABLE = ("METEOR unavailable: no offline WordNet (apt-get install wordnet-base, or set "
               "JANUS_WORDNET to a WordNet 3.0 dict/ directory)")
