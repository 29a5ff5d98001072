"""Correctness and speed of csm-jax on one GPU, in one run: benchmarks/gpu_check.sh OUT_DIR [--smoke].

The steps (plan.py, one short module each) run most important figures first, each in its own process under a time
budget (driver.py); every figure is appended to OUT_DIR/figures.jsonl the moment it is measured (record.py), and the
table (table.py) ends the run. --smoke: the same steps on the CPU at tiny sizes.
"""
