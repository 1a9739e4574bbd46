"""phsa_train.torchrun passes only the options this torch's torchrun knows (the GPU image's torch 2.11 has no
``--shutdown-timeout``; the launcher always passes it)."""
import argparse

import phsa_train.torchrun as tr

ARGS = ["--standalone", "--shutdown-timeout=300", "--nproc-per-node=2", "--shutdown-timeout", "60", "-m", "x"]


def test_known_option_passes_through():
    if "--shutdown-timeout" in {s for a in tr.get_args_parser()._actions for s in a.option_strings}:
        assert tr.supported_arguments(ARGS) == ARGS


def test_unknown_option_is_dropped_with_its_value(monkeypatch):
    def older_parser():
        p = argparse.ArgumentParser()
        p.add_argument("--standalone", action="store_true")
        p.add_argument("--nproc-per-node")
        return p

    monkeypatch.setattr(tr, "get_args_parser", older_parser)
    assert tr.supported_arguments(ARGS) == ["--standalone", "--nproc-per-node=2", "-m", "x"]
