"""SDS-SparseGPT on the 7B-shaped checkpoint with the iteration budgets cut to 5 (memory-representative: the peak
does not depend on iteration counts; time is not representative and is projected by the plan instead).

    .venv/bin/python tools/scale_sds_short.py [CHECKPOINT]   # default /work/scale/llama7b-shape (scale_bench write)
The record is merged into docs/benchmarks/scale.json under its own method label."""
import json
import sys
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parent))
import scale_bench as sb
import yaml
stages = yaml.safe_load(sb.METHODS["sds-sparsegpt"].read_text())["stages"]
for s in stages:
    if s["kind"] in ("redense", "second_prune"):
        s["max_iter"] = 5
folder = sys.argv[1] if len(sys.argv) > 1 else "/work/scale/llama7b-shape"
record = sb.run_case(folder, "sds-sparsegpt", 1, Path(folder).parent / "wd", segments=16, length=512,
                     eval_tokens=2048, stages=stages)
record["method"] = "sds-sparsegpt (max_iter 5: memory only)"
record["bench_command"] = "tools/scale_sds_short.py"
path = sb.JSON_PATH
doc = json.loads(path.read_text())
doc["records"] = [r for r in doc["records"] if r["method"] != record["method"]] + [record]
path.write_text(json.dumps(doc, indent=2) + "\n")
print(json.dumps(record, indent=2))
print(sb.table(doc["records"]))
