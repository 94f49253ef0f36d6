"""Bad-input catalogue through the CLI: one line naming the field, no traceback, no run directory left.

Complements the per-module cases (tests/unit/test_presets.py, test_topology.py, test_theory.py,
tests/integration/test_cli.py, test_train.py): here the inputs arrive the way users give them.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from coopsgd.cli import main


def _files(tmp):
    f = {}
    f["bad_rows"] = tmp / "rows.csv"
    f["bad_rows"].write_text("0.5,0.5,0\n0.5,0.5,0\n0,0,0.97\n")
    f["nan"] = tmp / "nan.csv"
    f["nan"].write_text("0.5,nan\n0.5,0.5\n")
    f["nonsquare"] = tmp / "ns.json"
    f["nonsquare"].write_text(json.dumps([[1, 0, 0], [0, 1, 0]]))
    f["negative"] = tmp / "neg.csv"
    f["negative"].write_text("1.2,-0.2\n-0.2,1.2\n")
    f["pickled"] = tmp / "obj.npy"
    np.save(f["pickled"], np.array([{"a": 1}], dtype=object), allow_pickle=True)
    f["garbage_npy"] = tmp / "garbage.npy"
    f["garbage_npy"].write_bytes(b"not numpy at all")
    f["toml_syntax"] = tmp / "broken.toml"
    f["toml_syntax"].write_text('preset = "sync"\nworkers = \n')
    f["yaml_list"] = tmp / "list.yaml"
    f["yaml_list"].write_text("- 1\n- 2\n")
    f["unknown_key"] = tmp / "unknown.json"
    f["unknown_key"].write_text(json.dumps({"preset": "sync", "wrokers": 4}))
    f["bad_value"] = tmp / "badvalue.toml"
    f["bad_value"].write_text('preset = "easgd"\nalpha = "big"\n')
    f["txt_config"] = tmp / "config.txt"
    f["txt_config"].write_text("preset=sync")
    f["not_run"] = tmp / "emptydir"
    f["not_run"].mkdir()
    f["dup_json"] = tmp / "dup.json"
    f["dup_json"].write_text('{"preset": "sync", "lr": 0.1, "lr": 0.2}')
    f["dup_yaml"] = tmp / "dup.yaml"
    f["dup_yaml"].write_text("preset: sync\nlr: 0.1\nlr: 0.2\n")
    f["fifo"] = tmp / "pipe.toml"
    os.mkfifo(f["fifo"])
    f["unused_toml"] = tmp / "unused.toml"
    f["unused_toml"].write_text('preset = "sync"\nloss_estimate = "batch"\n')
    f["text_number"] = tmp / "text.yaml"
    f["text_number"].write_text('lr: "0.1"\n')
    return f


CASES = [
    # topologies and matrices
    (["topology", "custom", "--matrix", "{bad_rows}"], "row 2 sums to 0.97"),
    (["topology", "custom", "--matrix", "{nan}"], "NaN"),
    (["topology", "custom", "--matrix", "{nonsquare}"], "square"),
    (["topology", "custom", "--matrix", "{negative}"], "-0.2"),
    (["topology", "custom", "--matrix", "{pickled}"], "obj.npy"),
    (["topology", "custom", "--matrix", "{garbage_npy}"], "garbage.npy"),
    (["topology", "torus", "--workers", "7"], "workers"),
    (["topology", "random", "--workers", "6", "--p", "1.5"], "p"),
    (["topology", "groups", "--workers", "6", "--groups", "4"], "groups"),
    (["topology", "one_peer_exponential", "--workers", "6"], "workers"),
    # flags are spelled in full (an abbreviation could silently mean another flag)
    (["run", "--optim", "adamw"], "--optim"),
    (["run", "--optimizer-st", "mix"], "--optimizer-st"),
    # config files
    (["run", "--config", "{toml_syntax}"], "broken.toml"),
    (["run", "--config", "{yaml_list}"], "config"),
    (["run", "--config", "{unknown_key}"], "wrokers"),
    (["run", "--config", "{bad_value}"], "alpha"),
    (["run", "--config", "{txt_config}"], ".toml"),
    (["run", "--config", "/does/not/exist.toml"], "no such file"),
    # issue 24, class 5: a key given twice (as TOML refuses it), an empty string never means "the default"
    (["run", "--config", "{dup_json}"], "duplicate key 'lr'"),
    (["run", "--config", "{dup_yaml}"], "duplicate key 'lr' at line 3"),
    (["run", "--config", ""], "--config=''"),
    (["run", "--resume", ""], "--resume=''"),
    # ... and an entry given twice in a list-valued flag is refused
    (["run", "--lr-decay-epochs", "1,1"], "given twice"),
    # inputs that are not regular files say what they are (reading a FIFO would block)
    (["run", "--config", "{fifo}"], "is a FIFO (named pipe), not a regular file"),
    (["topology", "custom", "--matrix", "{fifo}"], "is a FIFO (named pipe), not a regular file"),
    (["compare", "--presets", "sync,local_sgd,sync"], "'sync' is given twice"),
    (["reproduce", "matrix-completion", "--quick", "--ranks", "1,2,1", "--out", "{not_run}/mc"], "1 is given twice"),
    # issue 24, class 5: a setting the run does not use (the optimizer, engine, preset, objective or partition
    # ignores it) is refused, never recorded as if it had been used; a number given as text is refused alike
    (["run", "--optimizer", "sgd", "--beta1", "0.5"], "beta1=0.5 is invalid: an Adam setting; the optimizer is sgd"),
    (["run", "--preset", "diloco", "--momentum", "0.9"], "the optimizer is adamw"),
    (["run", "--engine", "distributed", "--executor", "vmap", "--workers", "2"], "executor='vmap'"),
    (["run", "--engine", "reference", "--model", "lenet"], "model='lenet'"),
    (["run", "--engine", "reference", "--momentum", "0.9"], "momentum=0.9"),
    (["run", "--objective", "quadratic"], "objective='quadratic' is invalid: the simulate engine"),
    (["run", "--dirichlet-beta", "0.1"], "partition is 'iid'"),
    (["run", "--consensus-step", "0.5"], "does not gossip"),
    (["run", "--error-feedback", "on"], "compress is 'none'"),
    (["run", "--max-skips", "3"], "nan_policy is 'stop'"),
    (["run", "--timeout-s", "5"], "timeout_s=5.0 is invalid: the simulate engine"),
    (["run", "--preset", "sync", "--outer-lr", "0.5"], "outer_lr"),
    (["run", "--config", "{unused_toml}"], "unused.toml'"),
    (["run", "--config", "{text_number}"], "lr='0.1' is invalid: must be a number, not a string"),
    (["run", "--lr", "0.1x"], "--lr='0.1x' is invalid: must be a number"),
    (["compare", "--presets", "sync", "--engine", "distributed", "--compute", "constant", "--out", "{not_run}/c"],
     "nor does any other preset"),
    # flags
    (["run", "--workers", "-3"], "workers"),
    (["run", "--tau", "abc"], "--tau"),
    (["run", "--preset", "easgd", "--alpha", "0.5", "--workers", "4"], ""),  # warns, trains: see below
    (["run", "--preset", "hierarchical", "--workers", "6", "--groups", "4"], "groups"),
    (["run", "--preset", "dpsgd", "--topology", "hypercube", "--workers", "6"], "workers"),
    (["run", "--preset", "lsgd", "--lam", "-1"], "lam"),
    (["run", "--batch-size", "0"], "batch_size"),
    (["run", "--eval-every", "0"], "eval_every"),
    (["run", "--nan-policy", "ignore"], "nan_policy"),
    (["run", "--lr-decay-factor", "0"], "lr_decay_factor"),
    (["run", "--weights", "metropolis"], "weights"),
    # data
    (["run", "--dataset", "mnist"], "dataset"),
    (["run", "--model", "vgg16", "--dataset", "mnist_bundled"], "input_shape"),
    (["run", "--partition", "shards", "--shards-per-worker", "5000"], "shards_per_worker"),
    # checkpoints / resume
    (["run", "--resume", "{not_run}"], "--resume"),
    (["run", "--resume", "/no/such/run"], "--resume"),
    # theory
    (["theory", "--preset", "easgd", "--workers", "8", "--alpha", "-0.1"], "alpha"),
    (["theory", "--preset", "fedavg", "--fraction", "0"], "fraction"),
    (["theory", "--preset", "local_sgd", "--L", "1", "--sigma2", "1", "--lr", "0.1", "--steps", "0", "--f-gap", "1"], "steps"),
]


@pytest.mark.parametrize("argv,needle", [c for c in CASES if c[1]], ids=[" ".join(c[0]) for c in CASES if c[1]])
def test_catalogue(capsys, tmp_path, monkeypatch, argv, needle) -> None:
    monkeypatch.chdir(tmp_path)
    files = _files(tmp_path)
    argv = [a.format(**files) for a in argv]
    out_dir = tmp_path / "run_out"
    if argv[0] == "run" and "--resume" not in argv:
        argv += ["--max-steps", "2", "--out", str(out_dir)]
    code = main(argv)
    _, err = capsys.readouterr()
    assert code in (1, 2), err
    assert needle in err, err
    assert "Traceback" not in err
    assert err.strip().count("\n") == 0, err
    assert not out_dir.exists(), "a rejected run must not create its run directory"


def test_diverging_alpha_warns_and_is_reported(capsys, tmp_path) -> None:
    """alpha >= 2/(m+1) is legal (it warns); the divergence then stops the run naming worker and step."""
    code = main(["run", "--preset", "easgd", "--workers", "4", "--alpha", "0.9", "--lr", "0.1", "--max-steps", "400",
                 "--out", str(tmp_path / "r")])
    _, err = capsys.readouterr()
    assert "diverge" in err
    assert code == 1 and "step" in err and "Traceback" not in err


def test_catalogue_size() -> None:
    assert len([c for c in CASES if c[1]]) >= 30
