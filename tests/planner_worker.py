"""One measured run for the planner's accuracy test: python planner_worker.py FOLDER PRESET.

Imports everything and builds the pipeline classes first, takes the RSS as the baseline,
then loads and generates once under PRESET (vram_limit 0) and prints one JSON line: the
baseline, the measured peak RSS (VmHWM) and the planner's predicted peak.
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from pipelines import load_pipeline  # noqa: E402
from pipelines.loading import resolve_class, family_of_folder, read_model_index  # noqa: E402
from presets import preset_configs  # noqa: E402
from presets.footprint import footprint  # noqa: E402
from presets.planner import Job, predict  # noqa: E402
from test_pipelines import request_for  # noqa: E402
from vram import monitor  # noqa: E402


def main(folder: Path, preset: str, tiny_name: str) -> None:
    torch.set_num_threads(1)
    family = family_of_folder(folder)
    for name, entry in read_model_index(folder).items():   # import the model code up front
        if isinstance(entry, list) and all(entry):
            resolve_class(entry[0], entry[1], name)
    request, extra = request_for(tiny_name)
    sizes = footprint(family, folder)
    job = Job(request.width, request.height, request.frames or 1, cfg=family.guidance_is_cfg and request.guidance > 1)
    baseline = monitor.current_rss()
    monitor.reset_peak_rss()
    with load_pipeline(folder, preset_configs(preset, vram_limit=0)) as pipe:
        pipe.generate(request, pipeline_kwargs=extra)
    measured = monitor.peak_rss()
    predicted = predict(family, sizes, job, preset, on_gpu=False, dtype=torch.float32, vram_limit=0,
                        baseline_ram=baseline)
    print(json.dumps({"baseline": baseline, "measured": measured, "predicted": predicted.peak_ram_bytes,
                      "parts": predicted.parts}))


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2], sys.argv[3])
