"""Issue 16's probes through the real CLI (a subprocess each, but for the recipes' value bounds, which run `main`
in this process): bad --out, hostile recipes, bad values, broken inputs, a second run on a locked folder, SIGTERM.
Each must end in exit 2 (or 143/130) with one line naming what is wrong, no traceback, and nothing of the user's
touched."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
RECIPE = "model: builtin:digits-cnn\ndata: builtin:digits\n"


def cli(*args, cwd=None, env=None, timeout=300):
    environment = dict(os.environ, **(env or {}))
    return subprocess.run([sys.executable, "-m", "torchslim.cli", *map(str, args)], capture_output=True,
                          text=True, cwd=cwd, env=environment, timeout=timeout)


def assert_refused(result, *messages, code=2):
    err = result.stderr.strip()
    assert result.returncode == code, (result.returncode, err[-2000:])
    assert "Traceback" not in err and len(err.splitlines()) == 1, err[-2000:]
    assert err.startswith("torchslim: error: "), err
    for message in messages:
        assert message in err, err


@pytest.fixture
def recipe(tmp_path):
    path = tmp_path / "work" / "r.yaml"
    path.parent.mkdir()
    path.write_text(RECIPE)
    return path


# -- --out --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("out, overwrite, message", [
    (".", False, "is the working folder"),
    (".", True, "is the working folder"),
    ("..", True, "contains the working folder"),
    ("PWD", True, "is the working folder"),
    ("/", True, "is a filesystem root"),
    ("/proc/torchslim-out", True, "is under /proc, a virtual filesystem"),
])
def test_out_never_replaces_the_working_folder_a_root_or_proc(recipe, out, overwrite, message):
    work = recipe.parent
    before = sorted(p.name for p in work.iterdir())
    out = str(work) if out == "PWD" else out
    result = cli("compress", recipe.name, "--out", out, *(["--overwrite"] if overwrite else []), cwd=work)
    assert_refused(result, f"--out {out}:", message)
    assert sorted(p.name for p in work.iterdir()) == before and recipe.read_text() == RECIPE


def test_out_never_replaces_the_home_folder_even_spelled_tilde(recipe, tmp_path):
    home = tmp_path / "users" / "me"
    (home / "thesis").mkdir(parents=True)
    (home / "thesis" / "chapter1.tex").write_text("years of work")
    for out, relation in (("~", "is"), (str(home), "is"), (str(home.parent), "contains")):
        result = cli("compress", recipe, "--out", out, "--overwrite", env={"HOME": str(home)}, cwd=recipe.parent)
        assert_refused(result, f"{relation} the home folder", "never replaces it")
    assert (home / "thesis" / "chapter1.tex").read_text() == "years of work"


def test_out_never_replaces_the_folder_holding_the_recipe(recipe, tmp_path):
    result = cli("compress", recipe, "--out", recipe.parent, "--overwrite", cwd=tmp_path)
    assert_refused(result, "holds the recipe", "never replaces it")
    result = cli("compress", recipe, "--out", recipe, "--overwrite", cwd=tmp_path)  # the recipe file itself
    assert_refused(result, "holds the recipe")
    assert recipe.read_text() == RECIPE


def test_out_refuses_a_users_folder_a_file_and_a_symlink_untouched(recipe, tmp_path):
    thesis = tmp_path / "thesis"
    thesis.mkdir()
    (thesis / "chapter1.tex").write_text("years of work")
    assert_refused(cli("compress", recipe, "--out", thesis), "was not written by torchslim", "--overwrite")
    notes = tmp_path / "notes.txt"
    notes.write_text("keep me")
    assert_refused(cli("compress", recipe, "--out", notes), "is an existing file", "--overwrite")
    link = tmp_path / "link"
    link.symlink_to(thesis)
    assert_refused(cli("compress", recipe, "--out", link, "--overwrite"), "is a symbolic link")
    assert (thesis / "chapter1.tex").read_text() == "years of work" and notes.read_text() == "keep me"
    assert link.is_symlink() and sorted(p.name for p in tmp_path.iterdir()) == ["link", "notes.txt", "thesis",
                                                                              "work"]


def test_out_below_a_file_or_unwritable_is_refused_at_the_start(recipe, tmp_path):
    assert_refused(cli("compress", recipe, "--out", recipe / "sub"), "is a file, not a folder")
    assert_refused(cli("compress", recipe, "--out", "/sys/torchslim-out"), "virtual filesystem")
    if os.geteuid() != 0:  # root writes through permission bits
        locked = tmp_path / "readonly"
        locked.mkdir(mode=0o555)
        assert_refused(cli("compress", recipe, "--out", locked / "out"), "cannot write in", "Permission denied")


def test_a_previous_runs_folder_with_a_users_file_added_is_refused(tmp_path):
    from torchslim.integrity import write_manifest

    out = tmp_path / "out"
    out.mkdir()
    (out / "report.json").write_text("{}")
    write_manifest(out)
    (out / "my-notes.txt").write_text("mine")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(RECIPE)
    assert_refused(cli("compress", recipe, "--out", out), "holds files torchslim did not write (my-notes.txt)")
    assert (out / "my-notes.txt").read_text() == "mine"


def test_a_second_run_on_a_locked_folder_names_the_holder_and_a_stale_lock_does_not_block(tmp_path):
    from torchslim._output import OutputLock

    module = tmp_path / "m.py"
    module.write_text("def make():\n    raise RuntimeError('resolved after the lock')\n")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model: file:{module}:make\ndata: builtin:digits\n")
    out = tmp_path / "out"
    with OutputLock(out):
        result = cli("compress", recipe, "--out", out)
        assert_refused(result, f"in use by another torchslim run (process {os.getpid()}", ".out.lock")
    # A lock file left by a dead process (its flock died with it) does not block: the next error is the recipe's.
    (tmp_path / ".out.lock").write_text("999999\n")
    assert_refused(cli("compress", recipe, "--out", out), "make() raised RuntimeError: resolved after the lock")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.py", "r.yaml"]  # the lock file is gone too


# -- recipes ------------------------------------------------------------------------------------------------
LAUGHS = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 9)}]\n" for i in range(8))


# Recipes that attack the YAML parser itself (alias bombs, deep nesting, huge scalars) go through a real process;
# the bounds on values take the same path from the parsed recipe on, so they run in this one (no start-up each).
@pytest.mark.parametrize("text, message, process", [
    (RECIPE + "steps:\n  - prune: {method: magnitude, skip: *x}\n" + LAUGHS, "anchors or aliases", True),
    (RECIPE + "model: builtin:tiny-lm\n", "duplicate key 'model' (first at line 1)", False),
    (RECIPE + "steps:\n  - prune: {method: magnitude, sparsity: 0.5, sparsity: 0.6}\n", "duplicate key 'sparsity'",
     False),
    (RECIPE + "measure: {batch_size: 1000000000}\n", "measure.batch_size: must be <= 65,536, got 1,000,000,000",
     False),
    (RECIPE + "measure: {threads: 100000}\n", "measure.threads: must be <= 4,096", False),
    (RECIPE + "steps:\n  - finetune: {epochs: 10000000}\n", "steps[0].finetune.epochs: must be <= 100,000", False),
    (RECIPE + "steps:\n  - finetune: {optimizer: {lr: .inf}}\n", "steps[0].finetune.optimizer.lr: must be a finite",
     False),
    (RECIPE + "steps:\n  - finetune: {optimizer: {lr: .nan}}\n", "optimizer.lr: must be a finite number, got nan",
     False),
    (RECIPE + "steps:\n  - finetune: {optimizer: {lr: 1e999}}\n", "optimizer.lr: must be a finite number", False),
    (RECIPE + "seed: " + "9" * 5000 + "\n", "malformed YAML", True),
    (RECIPE + "steps: " + "[" * 3000 + "\n", "malformed YAML", True),
    (RECIPE + "steps:\n  - prune: {method: magnitude, skip: " + "x" * 100_000 + "}\n", "(100002 characters)", True),
])
def test_hostile_recipes_exit_2_at_once_naming_the_field(tmp_path, capsys, text, message, process):
    from torchslim.cli import main

    recipe = tmp_path / "r.yaml"
    recipe.write_text(text)
    args = ["compress", recipe, "--out", tmp_path / "out"]
    if process:
        result = cli(*args, timeout=300)  # a hang fails here, not by a clock
    else:
        code = main([str(a) for a in args])
        captured = capsys.readouterr()
        result = subprocess.CompletedProcess(args, code, captured.out, captured.err)
    assert_refused(result, str(recipe), message)
    assert len(result.stderr) < 600
    assert not (tmp_path / "out").exists()


def test_a_huge_or_binary_recipe_is_refused(tmp_path):
    big = tmp_path / "big.yaml"
    big.write_text(RECIPE + "# " + "x" * (1 << 20) + "\n")
    assert_refused(cli("compress", big, "--out", tmp_path / "out"), "a recipe is at most 1,048,576 bytes")
    binary = tmp_path / "bin.yaml"
    binary.write_bytes(b"\xff\xfe\x00model")
    assert_refused(cli("compress", binary, "--out", tmp_path / "out"), "not a text file")


def test_set_values_still_parse_and_are_checked(tmp_path):
    result = cli("demo", "--out", tmp_path / "d", "--set", "measure.batch_size=1e9", "--set", "seed=1")
    assert_refused(result, "demo: measure.batch_size: expected int, got '1e9'")
    result = cli("demo", "--out", tmp_path / "d", "--set", "steps.1.finetune.optimizer.lr=.inf")
    assert_refused(result, "demo: steps[1].finetune.optimizer.lr: must be a finite number, got inf")


def test_profile_batch_size_and_threads_are_bounded():
    assert_refused(cli("profile", "builtin:digits-cnn", "--batch-size", "1000000000"),
                   "--batch-size: must be in [1, 65,536], got 1,000,000,000")
    assert_refused(cli("profile", "builtin:digits-cnn", "--threads", "99999"), "--threads: must be in [0, 4,096]")


# -- inputs -------------------------------------------------------------------------------------------------
def test_a_file_factory_that_raises_names_the_file_and_the_error(tmp_path):
    module = tmp_path / "mymodel.py"
    module.write_text("def make():\n    raise RuntimeError('weights file missing')\n"
                      "def make_exit():\n    raise SystemExit(3)\n")
    for factory, message in (("make", "make() raised RuntimeError: weights file missing"),
                             ("make_exit", "make_exit() raised SystemExit: 3")):
        result = cli("profile", f"file:{module}:{factory}")
        assert_refused(result, f"model: file:{module}:{factory}: {module}: {message}")


def test_a_teacher_file_factory_that_raises_exits_2(tmp_path):
    module = tmp_path / "teacher.py"
    module.write_text("def make():\n    raise ValueError('no teacher today')\n")
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: builtin:digits-mlp\ndata: builtin:digits\n"  # the small built-in: a quick baseline
                      f"steps:\n  - finetune: {{epochs: 1, distill: {{teacher: 'file:{module}:make'}}}}\n"
                      "measure: {batch_size: 8, warmup: 0, repeats: 1, max_eval_samples: 32}\n")
    result = cli("compress", recipe, "--out", tmp_path / "out", "--quiet")
    assert_refused(result, "make() raised ValueError: no teacher today")
    assert not (tmp_path / "out").exists()


def test_a_corrupt_jpeg_in_an_image_folder_names_the_file(tmp_path):
    from PIL import Image

    root = tmp_path / "images"
    for label in ("cat", "dog"):
        (root / label).mkdir(parents=True)
        for i in range(6):
            Image.new("RGB", (8, 8), (40 * i, 0, 0)).save(root / label / f"{i}.jpg", quality=90)
    for path in sorted(root.rglob("*.jpg")):
        path.write_bytes(path.read_bytes()[:120])  # every file cut short: whichever is decoded first fails
    model = tmp_path / "m.py"
    model.write_text("import torch\ndef make():\n    return torch.nn.Sequential(torch.nn.Flatten(), "
                     "torch.nn.LazyLinear(2))\n")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model: file:{model}:make\ndata: imagefolder:{root}\n"
                      "measure: {batch_size: 2, warmup: 0, repeats: 1}\n")
    result = cli("compress", recipe, "--out", tmp_path / "out")
    assert_refused(result, f"data: imagefolder:{root}: {root}/cat/0.jpg: unreadable image",
                   "remove or replace the file")


def test_a_hugging_face_folder_with_only_pickled_weights_is_refused(tmp_path):
    folder = tmp_path / "hfmodel"
    folder.mkdir()
    (folder / "config.json").write_text('{"architectures": ["BertModel"], "model_type": "bert"}')
    (folder / "pytorch_model.bin").write_bytes(b"not even a pickle")
    result = cli("profile", f"hf:{folder}")
    assert_refused(result, "holds only pickled weights (pytorch_model.bin)", "TORCHSLIM_ALLOW_PICKLE=1")


# -- signals ------------------------------------------------------------------------------------------------
_RUNNER = textwrap.dedent("""
    import sys
    sys.path.insert(0, {tests!r})
    import conftest  # registers builtin:tiny-test-cnn
    import signal
    from torchslim.cli import main

    # A test run started in the background (`make test &`, nohup) hands its children SIGINT ignored, and Python
    # then installs no KeyboardInterrupt handler: the run under test gets the one a terminal gives it.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    from torchslim.recover import checkpoint

    write = checkpoint.write_checkpoint

    def write_and_tell(root, tensors, state):  # the test waits for this line, not for a moment on the clock
        folder = write(root, tensors, state)
        print("checkpoint written", flush=True)
        return folder

    checkpoint.write_checkpoint = write_and_tell
    sys.exit(main(sys.argv[1:]))
""")


@pytest.mark.parametrize("signum, code, word", [(signal.SIGTERM, 143, "terminated (SIGTERM)"),
                                                (signal.SIGINT, 130, "interrupted")])
def test_sigterm_and_sigint_clean_scratch_keep_checkpoints_and_exit_with_a_line(tmp_path, signum, code, word):
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: builtin:tiny-test-cnn\ndata: builtin:digits\nsteps:\n"
                      "  - finetune: {epochs: 50, batch_size: 16, checkpoint_every: 5, device: cpu}\n"
                      "measure: {batch_size: 8, warmup: 0, repeats: 1, max_eval_samples: 32, threads: 1}\n")
    runner = tmp_path / "runner.py"
    runner.write_text(_RUNNER.format(tests=str(TESTS)))
    out = tmp_path / "out"
    process = subprocess.Popen([sys.executable, str(runner), "compress", str(recipe), "--out", str(out), "--quiet"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=dict(os.environ, TMPDIR=str(scratch), OMP_NUM_THREADS="1"))
    state = tmp_path / "out.checkpoints" / "step0-finetune" / "latest" / "state.json"
    line = process.stdout.readline()  # the run writes its first checkpoint, or ends (an empty read)
    assert line == "checkpoint written\n" and process.poll() is None, process.communicate()[1][-2000:]
    assert list(scratch.glob("torchslim-*")), "the run keeps its scratch folder in TMPDIR"
    process.send_signal(signum)
    _, err = process.communicate(timeout=120)
    assert process.returncode == code, err[-2000:]
    assert err.strip().splitlines()[-1].startswith(f"torchslim: {word}; scratch files removed")
    assert "Traceback" not in err
    assert list(scratch.glob("torchslim-*")) == []  # the scratch folder is gone
    assert state.exists() and not out.exists()  # checkpoints kept; nothing half-written
    assert not (tmp_path / ".out.lock").exists()
