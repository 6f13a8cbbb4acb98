"""Shard-writing machinery shared by :mod:`data_prep.folder2wds` and :mod:`data_prep.rec2wds`: the front door, which
re-exports the public names of the modules that do the work.

A *source* (:mod:`data_prep.shard_source`) lists its samples once, in a canonical order (``Source.sizes`` /
``Source.entry``; big listings live in numpy arrays, ~24 bytes per record), and reads one sample on demand
(``Source.read``). :func:`run` (:mod:`data_prep.shard_run`) then

1. **plans** (:mod:`data_prep.shard_plan`): a seeded permutation of the entries, cut into shards by sample count or by
   bytes, so every shard mixes identities; the plan is a pure function of (source listing, seed, shard size), hashed
   into ``plan`` (no timestamps anywhere);
2. **writes** (:mod:`data_prep.shard_writer`) each shard as a whole in a worker process (``multiprocessing``): the tar
   is written to ``.shard-NNNNNN.tar.tmp<pid>``, fsynced and renamed, so no half-written tar ever carries a final name.
   Tars are deterministic (fixed mtime/uid/gid/uname, USTAR, members in plan order, each sample's members sorted by
   extension), so a rerun gives byte-identical shards;
3. **journals** (:mod:`data_prep.shard_journal`) every finished shard (name, count, sha256, corrupt records) in
   ``OUT/.journal.jsonl``. A run started again after a kill keeps each shard whose file still has the journaled sha256
   and rewrites the others, so it ends with identical shards;
4. writes ``manifest.json`` (atomic) unless more than ``max_bad_fraction`` of the records were bad, in which case it
   writes ``OUT/corrupt.json`` and exits with status 1 (:mod:`data_prep.shard_summary`).

Per sample the tar holds ``<key>.<ext>`` (the original image bytes, ``ext`` from the bytes' real format, see
:data:`FORMAT_EXTENSIONS` in :mod:`data_prep.shard_images`), ``<key>.cls`` (ASCII integer label), ``<key>.src`` (source path
or ``file:key``), ``<key>.crc`` (the CRC-32 of the image bytes, 8 lowercase hex digits: both loaders check it, so an
image whose bytes were damaged after sharding — a flipped bit in the JPEG body, which decoders decode into a wrong
picture without an error — is skipped and counted instead of trained on) and, when a RecordIO record carries several
float labels, ``<key>.labels`` (JSON list of all of them, the first being the class label). The commands' shared
options and error handling are in :mod:`data_prep.shard_cli`.
"""

from __future__ import annotations

from data_prep.shard_cli import add_common_args, finish, main_wrapper, run_cli
from data_prep.shard_images import FORMAT_EXTENSIONS, check_crc, image_crc, image_ext
from data_prep.shard_journal import JOURNAL
from data_prep.shard_plan import TOOL_VERSION, Plan, make_plan
from data_prep.shard_run import STOP_ENV, run
from data_prep.shard_source import BadRecord, Sample, Source
from data_prep.shard_summary import CORRUPT_REPORT, MAX_LISTED_CORRUPT, RunResult
from data_prep.shard_writer import SHARD_PATTERN, TarStream

__all__ = [
    "CORRUPT_REPORT",
    "FORMAT_EXTENSIONS",
    "JOURNAL",
    "MAX_LISTED_CORRUPT",
    "SHARD_PATTERN",
    "STOP_ENV",
    "TOOL_VERSION",
    "BadRecord",
    "Plan",
    "RunResult",
    "Sample",
    "Source",
    "TarStream",
    "add_common_args",
    "check_crc",
    "finish",
    "image_crc",
    "image_ext",
    "main_wrapper",
    "make_plan",
    "run",
    "run_cli",
]
