"""python -m pipelines.generate, run as a user would."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "pipelines.generate", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def test_generate_prints_the_file_and_a_memory_summary(tiny_family, tmp_path):
    out = tmp_path / "cat.png"
    done = run_cli("--model", str(tiny_family("sdxl")), "--preset", "disk", "--vram-limit", "0",
                   "--prompt", "a cat", "--steps", "2", "--width", "32", "--height", "32", "--seed", "7",
                   "--out", str(out))
    assert done.returncode == 0, done.stderr
    assert f"saved {out}" in done.stdout and out.is_file()
    assert "peak RAM" in done.stdout and "s/step" in done.stdout and "denoising" in done.stdout
    assert "step 2/2" in done.stderr


def test_bad_input_is_one_line_and_exit_code_2(tiny_family, tmp_path):
    done = run_cli("--model", str(tiny_family("sdxl")), "--prompt", "a cat", "--steps", "0", "--out", str(tmp_path))
    assert done.returncode == 2 and done.stderr.strip().splitlines()[-1].startswith("error: steps")
    assert "Traceback" not in done.stderr and not any(tmp_path.iterdir())
    done = run_cli("--model", "sdxl-turbo", "--prompt", "a cat")
    assert done.returncode == 2 and "unknown model 'sdxl-turbo'" in done.stderr
    done = run_cli("--model", "sdxl", "--preset", "warp", "--prompt", "a cat")
    assert done.returncode == 2 and "unknown preset 'warp'" in done.stderr


def test_auto_preset_explains_its_choice(tiny_family, tmp_path):
    done = run_cli("--model", str(tiny_family("sdxl")), "--prompt", "a cat", "--steps", "2", "--width", "32",
                   "--height", "32", "--out", str(tmp_path))
    assert done.returncode == 0, done.stderr
    assert "\\n-> " in done.stderr.replace("\n", "\\n") and "saved" in done.stdout
    assert "predicted peak RAM" in done.stdout


def test_wrong_output_suffix_fails_before_loading(tiny_family, tmp_path):
    done = run_cli("--model", str(tiny_family("sdxl")), "--preset", "basic", "--prompt", "a cat",
                   "--out", str(tmp_path / "cat.jpg"))
    assert done.returncode == 2 and "should end in .png" in done.stderr.splitlines()[-1]
    assert "loaded" not in done.stderr
