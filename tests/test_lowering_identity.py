"""The code generator's refactors keep every generated kernel byte for byte: each program the tests
cover, on both targets and under several schedules, hashes as recorded (``tests/lowering_corpus.py``).
A change that means to alter generated code rewrites the record in the same commit and says why."""

import json

from lowering_corpus import RECORD, corpus


def test_every_lowering_is_unchanged():
    recorded = json.loads(RECORD.read_text())
    now = corpus()
    assert now.keys() == recorded.keys()
    changed = sorted(k for k in now if now[k] != recorded[k])
    assert not changed, f"{len(changed)} of {len(now)} lowerings changed, e.g. {changed[:5]}"
