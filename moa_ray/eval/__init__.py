"""Evaluation jobs: generate answers over a dataset, judge them, report the metrics.

Every stage reads and writes Parquet with an explicit schema (:mod:`moa_ray.eval.schema`)
through :mod:`moa_ray.eval.store`, which makes each stage resumable: a rerun skips
the rows that are already done and retries the ones that failed.
"""
