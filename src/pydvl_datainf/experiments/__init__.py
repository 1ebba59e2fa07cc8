"""Application code: data sets, fine-tuning, baselines, pipelines and the demo.

This subpackage reproduces the paper's experiments on top of the library
(`pydvl_datainf`); the library never imports it. Modules:

* [datasets][pydvl_datainf.experiments.datasets]: offline text data sets, the
  user's own texts and labels, label flips and splits;
* [finetune][pydvl_datainf.experiments.finetune]: LoRA fine-tuning of a
  sequence classifier (the packaged MiniLM or the user's own model);
* [baselines][pydvl_datainf.experiments.baselines]: the influence methods
  DataInf is compared with, and the metrics;
* [ekfac][pydvl_datainf.experiments.ekfac]: EK-FAC under any per-sample
  loss, or read from pyDVL;
* [generative_tasks][pydvl_datainf.experiments.generative_tasks] and
  [llm][pydvl_datainf.experiments.llm]: the causal language model experiment;
* [pipelines][pydvl_datainf.experiments.pipelines]: fine-tune, then compare
  methods (used by the tutorials and the demo);
* [demo][pydvl_datainf.experiments.demo]: `python -m pydvl_datainf.demo`.
"""

from .pipelines import (
    METHOD_LABELS,
    METHODS,
    FineTunedTask,
    MethodComparison,
    compare_methods,
    finetune_task,
    fit_datainf,
    harm,
    lora_groups,
    mislabel_task,
    summary_rows,
)

__all__ = [
    "FineTunedTask",
    "MethodComparison",
    "METHODS",
    "METHOD_LABELS",
    "compare_methods",
    "finetune_task",
    "fit_datainf",
    "harm",
    "lora_groups",
    "mislabel_task",
    "summary_rows",
]
