"""python -m hsvkernels: exit codes and output of info, compress and report."""
import json
import os
import subprocess
import sys

import pytest
import torch

from hsvkernels.__main__ import main

torchvision = pytest.importorskip("torchvision")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_cli(*args):
    """The real `python -m hsvkernels`, from this checkout."""
    return subprocess.run([sys.executable, "-m", "hsvkernels", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)


def test_compress_resnet18_verify(capsys):
    # In-process (the subprocess path is covered below); resnet18's SVDs dominate the time.
    assert main(["compress", "torchvision:resnet18", "--method", "svd", "--ratio", "4", "--input-size", "64",
                 "--verify"]) == 0
    out = capsys.readouterr().out
    assert "layer4.1.conv2" in out and "TOTAL (20/20 factorized)" in out
    assert "compressed vs dense rebuilt from factors: max abs diff" in out
    assert "relative output error" in out and "verify: OK" in out


def test_unknown_model_fails_with_one_line():
    r = run_cli("compress", "torchvision:resnet1")
    assert r.returncode == 1
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert "unknown torchvision model 'resnet1'" in r.stderr and "resnet18" in r.stderr


def test_missing_paths_are_named(tmp_path, capsys):
    assert main(["compress", str(tmp_path / "no_such_dir")]) == 1
    assert "no_such_dir': no such directory, and not a torchvision:NAME reference" in capsys.readouterr().err
    assert main(["export", "torchvision:resnet18", "--pt2", str(tmp_path / "nowhere" / "m.pt2")]) == 1
    assert "--pt2 %s: directory %s does not exist" % (tmp_path / "nowhere" / "m.pt2", tmp_path / "nowhere") \
        in capsys.readouterr().err
    assert main(["compress", "torchvision:resnet18", "--plot", str(tmp_path / "nowhere" / "p.png")]) == 1
    assert "--plot %s: directory" % (tmp_path / "nowhere" / "p.png") in capsys.readouterr().err
    with pytest.raises(SystemExit):   # was refused by Adam only after the whole compression
        main(["compress", "torchvision:resnet18", "--finetune", "digits", "--lr", "nan"])
    assert "argument --lr: expected a finite number > 0, got 'nan'" in capsys.readouterr().err


def test_usage_errors_exit_2(capsys):
    for argv in ([], ["compress"], ["compress", "torchvision:resnet18", "--input-size", "axb"], ["frobnicate"]):
        with pytest.raises(SystemExit) as e:
            code = main(argv)
            raise SystemExit(code)
        assert e.value.code == 2, argv


def test_compress_out_then_report_and_recompress(tmp_path, capsys):
    d = str(tmp_path / "m")
    assert main(["compress", "torchvision:mobilenet_v2", "--method", "hsv", "--ratio", "2", "--input-size", "1x3x32x32",
                 "--min-params", "20000", "--out", d, "--json"]) == 0
    captured = capsys.readouterr()
    report = json.loads(captured.out)  # --json keeps stdout machine-readable
    assert report["totals"]["factorized"] > 0 and "saved to" in captured.err
    assert any("grouped" in row["reason"] for row in report["layers"])
    assert main(["report", d]) == 0
    assert "TOTAL (%d/" % report["totals"]["factorized"] in capsys.readouterr().out
    png = str(tmp_path / "r.png")
    assert main(["report", d, "--markdown", "--plot", png]) == 0
    assert capsys.readouterr().out.startswith("| layer |") and os.path.getsize(png) > 0
    # A saved directory is a model source too: the remaining convs stay as they were.
    assert main(["compress", d, "--ratio", "2", "--input-size", "32", "--min-params", "20000", "--verify"]) == 0
    assert "verify: OK" in capsys.readouterr().out
    # bench names the method the directory holds, not its --method default
    assert main(["bench", d, "--input-size", "32", "--batch", "1", "--min-run-time", "0.02", "--threads", "1",
                 "--host-malloc", "default", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["method"] == "hsv"
    assert main(["bench", d, "--method", "svd", "--host-malloc", "default"]) == 1
    assert "--method: for torchvision:NAME models" in capsys.readouterr().err


def test_weights_file(tmp_path, capsys):
    model = torchvision.models.resnet18(weights=None)
    good = str(tmp_path / "w.pt")
    torch.save(model.state_dict(), good)
    assert main(["compress", "torchvision:resnet18", "--weights", good, "--rank", "8", "--input-size", "32",
                 "--skip", "layer[234]*"]) == 0
    assert "skip pattern" in capsys.readouterr().out
    bad = str(tmp_path / "bad.pt")
    torch.save(torchvision.models.resnet34(weights=None).state_dict(), bad)
    assert main(["compress", "torchvision:resnet18", "--weights", bad, "--input-size", "32"]) == 1
    err = capsys.readouterr().err
    assert "do not fit the model" in err and "Unexpected key(s)" in err and "layer1.2.conv1.weight" in err
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    assert main(["compress", "torchvision:resnet18", "--weights", str(junk)]) == 1
    assert "cannot read" in capsys.readouterr().err


def test_report_on_missing_dir(tmp_path, capsys):
    assert main(["report", str(tmp_path / "nothing")]) == 1
    assert "not a directory" in capsys.readouterr().err


def test_bad_method_option_fails_cleanly(capsys):
    assert main(["compress", "torchvision:resnet18", "--option", "bogus=1", "--input-size", "32",
                 "--skip", "layer[234]*"]) == 1
    err = capsys.readouterr().err
    assert "no layer could be decomposed" in err and "bogus" in err
    assert main(["compress", "torchvision:resnet18", "--option", "not an option"]) == 1
    assert "KEY=VALUE" in capsys.readouterr().err


def test_bench_times_dense_and_compressed():
    import json as _json
    import subprocess as _sp
    import sys as _sys

    # also --fold-bn --fuse-epilogues (one subprocess: each costs seconds of imports and SVDs)
    out = _sp.run([_sys.executable, "-m", "hsvkernels", "bench", "torchvision:resnet18", "--input-size", "32",
                   "--batch", "1,2", "--min-run-time", "0.05", "--threads", "1", "--json", "--fold-bn",
                   "--fuse-epilogues"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    result = _json.loads(out.stdout)
    assert result["fold_bn"] and result["fuse_epilogues"]
    assert [r["batch"] for r in result["rows"]] == [1, 2]
    assert all(r["dense_s"] > 0 and r["compressed_s"] > 0 and r["ratio"] > 0 for r in result["rows"])
    assert result["flags"]["host_malloc"].startswith(("retain", "default: not glibc"))   # retained by default


def test_bench_usage_errors(tmp_path, capsys):
    # in process: they come before any model is built (--host-malloc default leaves this process's malloc be)
    (tmp_path / "model").mkdir()
    assert main(["bench", str(tmp_path / "model"), "--fold-bn", "--host-malloc", "default"]) == 1
    assert "--fold-bn is for torchvision:NAME models" in capsys.readouterr().err
    assert main(["bench", "torchvision:resnet18", "--batch", "one", "--host-malloc", "default"]) == 1
    assert "--batch expects" in capsys.readouterr().err
    assert main(["bench", "torchvision:resnet18", "--per-layer", "--compile", "--host-malloc", "default"]) == 1
    assert "--per-layer times the convs as module calls" in capsys.readouterr().err
    assert main(["bench", "torchvision:resnet18", "--runs", "0", "--host-malloc", "default"]) == 1
    assert "--runs must be at least 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["bench", "torchvision:resnet18", "--dtype", "float64"])
    assert "invalid choice: 'float64'" in capsys.readouterr().err
    assert main(["bench", "torchvision:resnet18", "--batch", "1,-1", "--host-malloc", "default"]) == 1
    assert "--batch sizes must be >= 1" in capsys.readouterr().err
    # NaN seconds kept torch's autorange running forever; bad devices and thread counts raised RuntimeErrors
    for flags, message in ((["--min-run-time", "nan"], "expected a finite number of seconds > 0, got 'nan'"),
                           (["--min-run-time", "-1"], "expected a finite number of seconds > 0"),
                           (["--threads", "-3"], "expected a positive integer, got '-3'"),
                           (["--device", "bogus"], "argument --device: Expected one of"),
                           (["--device", "cuda"] if not torch.cuda.is_available() else ["--device", "cuda:99x"],
                            "argument --device:")):
        with pytest.raises(SystemExit):
            main(["bench", "torchvision:resnet18"] + flags)
        assert message in capsys.readouterr().err, flags


def bench_json(*flags):
    """`bench torchvision:resnet18` on 32x32 inputs at batch 1 with these flags, its JSON result."""
    out = run_cli("bench", "torchvision:resnet18", "--input-size", "32", "--batch", "1", "--min-run-time", "0.05",
                  "--threads", "1", "--json", *flags)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["rows"][0]["ratio"] > 0
    return result


def test_bench_compile():
    assert bench_json("--method", "svd", "--compile")["compile"]


SUBCOMMANDS = ["info", "compress", "export", "bench", "report", "demo"]


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_each_subcommand_has_help(command, capsys):
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: hsvkernels %s" % command)
    assert "--help" in out and len(out.splitlines()) > 3


def test_top_level_help_lists_every_subcommand():
    r = run_cli("--help")
    assert r.returncode == 0 and r.stdout.startswith("usage: hsvkernels")
    assert all(c in r.stdout for c in SUBCOMMANDS)


def test_console_script_is_declared_and_resolves():
    import importlib
    import shutil

    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        scripts = tomllib.load(f)["project"]["scripts"]
    module, _, attr = scripts["hsvkernels"].partition(":")
    assert getattr(importlib.import_module(module), attr) is main
    # Where the package is installed (pip install -e .), the script itself must run.
    exe = shutil.which("hsvkernels", path=os.path.dirname(sys.executable)) or shutil.which("hsvkernels")
    if exe is None:
        pytest.skip("hsvkernels is not installed as a console script in this environment")
    r = subprocess.run([exe, "compress", "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.startswith("usage: hsvkernels compress"), r.stderr


def test_compress_with_budget(capsys):
    assert main(["compress", "torchvision:resnet18", "--budget", "3", "--input-size", "32", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["options"]["budget"] == {"ratio": 3.0}
    assert report["totals"]["compression"] >= 3 * 0.98
    assert main(["compress", "torchvision:resnet18", "--budget", "3", "--ratio", "2"]) == 1
    assert "do not also give --ratio" in capsys.readouterr().err


def test_compress_with_a_latency_budget(capsys):
    assert main(["compress", "torchvision:resnet18", "--latency-budget", "1.2", "--budget", "2", "--input-size", "32",
                 "--latency-points", "2", "--json"]) == 0
    captured = capsys.readouterr()
    report = json.loads(captured.out)
    assert report["options"]["budget"] == {"ratio": 2.0, "latency_ratio": 1.2}
    assert report["totals"]["compression"] >= 2 * 0.98
    assert "measured conv latency" in captured.err
    assert main(["compress", "torchvision:resnet18", "--latency-budget", "2", "--macs-budget", "2"]) == 1
    assert "not both" in capsys.readouterr().err
    # flags checked by their own names before anything is converted
    assert main(["compress", "torchvision:resnet18", "--budget", "0.5"]) == 1
    assert "--budget is a reduction factor >= 1" in capsys.readouterr().err
    assert main(["compress", "torchvision:resnet18", "--latency-budget", "0.5"]) == 1
    assert "--latency-budget is a latency reduction factor >= 1" in capsys.readouterr().err
    assert main(["compress", "torchvision:resnet18", "--latency-points", "3"]) == 1
    assert "give --latency-budget too" in capsys.readouterr().err
    assert main(["compress", "torchvision:resnet18", "--latency-budget", "2", "--latency-points", "1"]) == 1
    assert "--latency-points must be at least 2" in capsys.readouterr().err


def test_compress_then_finetune_on_an_image_folder(tmp_path, capsys):
    from PIL import Image
    for k, name in enumerate(["a", "b"]):
        (tmp_path / "imgs" / name).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (20, 20), (120 * k, 30 * i, 90)).save(tmp_path / "imgs" / name / ("%d.png" % i))
    folder, out = str(tmp_path / "imgs"), str(tmp_path / "out")
    assert main(["compress", "torchvision:resnet18", "--ratio", "4", "--input-size", "16", "--finetune", folder,
                 "--val", folder, "--batch-size", "4", "--distill", "--out", out]) == 0
    text = capsys.readouterr().out
    assert "accuracy before fine-tuning:" in text and "accuracy after fine-tuning:" in text
    assert "fine-tuned 2 step(s): loss" in text  # 6 images in batches of 4
    missing = str(tmp_path / "missing")
    assert main(["compress", "torchvision:resnet18", "--finetune", missing, "--input-size", "16"]) == 1
    assert "does not exist" in capsys.readouterr().err
    assert main(["compress", "torchvision:resnet18", "--val", folder]) == 1
    assert "need --finetune" in capsys.readouterr().err


def test_compress_then_finetune_on_digits(capsys):
    assert main(["compress", "torchvision:resnet18", "--rank", "8", "--input-size", "1x3x16x16", "--skip", "layer[34]*",
                 "--finetune", "digits", "--max-steps", "2", "--lr", "1e-3"]) == 0
    text = capsys.readouterr().out
    assert "accuracy before fine-tuning:" in text and "fine-tuned 2 step(s)" in text
    assert main(["compress", "torchvision:resnet18", "--finetune", "digits", "--input-size", "1x1x16x16",
                 "--max-steps", "1"]) == 1  # resnet18 takes RGB: the conversion's forward pass fails
    err = capsys.readouterr().err
    assert "forward pass on example_input of shape (1, 1, 16, 16) failed" in err and "Traceback" not in err


def test_compress_fold_bn_save_and_recompress(tmp_path, capsys):
    d = str(tmp_path / "m")
    assert main(["compress", "torchvision:resnet18", "--rank", "8", "--input-size", "32", "--fold-bn", "--out", d,
                 "--verify"]) == 0
    out = capsys.readouterr().out
    assert "+bn1 folded" in out and "batch norms folded into the conv before them: 20" in out
    assert "verify: OK" in out
    assert len(json.load(open(os.path.join(d, "hsv_plan.json")))["bn_folds"]) == 20
    # The saved, folded model is a source again (already-factorized layers are left as they are).
    assert main(["compress", d, "--rank", "4", "--input-size", "32", "--fold-bn", "--verify"]) == 0
    out = capsys.readouterr().out
    assert "verify: OK" in out and "TOTAL (0/0 factorized)" in out


def test_bench_hsv_channels_last_bfloat16_per_layer():
    from hsvkernels.__main__ import _per_layer_lines

    # one hsv run for all three (its decompositions take most of the time): hsv's 5-D factor once made
    # model.to(memory_format=torch.channels_last) raise here
    result = bench_json("--method", "hsv", "--dtype", "bfloat16", "--channels-last", "--fold-bn", "--per-layer",
                        "--runs", "2")
    assert result["channels_last"] and result["dtype"] == "bfloat16"
    per = result["rows"][0]["per_layer"]
    assert set(per) == {"dense", "compressed"}
    assert set(per["dense"]["layers"]) == set(per["compressed"]["layers"]) and "conv1" in per["dense"]["layers"]
    assert all(v["in_model_s"] > 0 and v["alone_s"] > 0 for v in per["compressed"]["layers"].values())
    text = "\n".join(_per_layer_lines(1, per))
    assert "layer4.1.conv2" in text and "in/alone" in text and "compressed forward" in text
