"""The command line a newcomer meets: `medkd experiments` in 100 columns, `medkd --help` at once."""

import subprocess
import sys
import time


def test_experiments_side_by_side_fit_100_columns():
    from medkd.experiments import rows, table

    def exp(name, epochs, f1, variant_f1):
        return {"rev": f"{name}0123456789", "name": name if name != "workspace" else None, "data": {
            "params": {"params.yaml": {"data": {"distill": {"train": {"epochs": epochs, "batch_size": 16}},
                                                 "seeds": {"primary": [42, 43, 44]}}}},
            "metrics": {"reports/metrics/teacher-medpix.json": {"data": {"test_avg_f1": f1}},
                        "reports/metrics/distill-mobilenetv2-minilm.json": {"data": {
                            "no-kd": {"test_avg_f1": variant_f1, "seeds": 3}, "kl-only": {"test_avg_f1": 0.9}}},
                        "reports/metrics/search.json": {"data": {"best_dev_avg_f1": 0.88}}}}}

    shown = [{**exp("workspace", 2, 0.87, 0.88), "rev": "workspace"},
             {**exp("main", 2, 0.87, 0.88), "experiments": [{"revs": [exp("epochs-5-with-a-long-name", 5, 0.86, 0.89)]}]}]
    found = list(rows(shown))
    assert [r["name"] for r in found] == ["workspace", "main", "epochs-5-with-a-long-name"]
    text = table(found)
    lines = text.splitlines()
    assert max(len(line) for line in lines) <= 100
    assert lines[0].split()[-1] == "epochs-5-with-a…"  # names shortened to their column
    assert [line.split()[0] for line in lines[2:3]] == ["distill.train.epochs"]  # only the params that differ
    assert "batch_size" not in text and "seeds.primary" not in text
    assert "  mobilenetv2-minilm no-kd" in text and text.count("0.8900") == 1 and "search best (dev)" in text


def test_help_answers_without_loading_the_study():
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-X", "importtime", "-m", "medkd", "--help"], capture_output=True, text=True)
    assert done.returncode == 0 and "check-params" in done.stdout and "experiments" in done.stdout
    assert " torch" not in done.stderr and " pandas" not in done.stderr  # importtime lists every module loaded
    assert time.perf_counter() - started < 5
