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
* [generative_tasks][pydvl_datainf.experiments.generative_tasks],
  [llm][pydvl_datainf.experiments.llm] and
  [influential][pydvl_datainf.experiments.influential]: the causal language
  model experiment: the paper's tasks
  ([paper_task][pydvl_datainf.experiments.generative_tasks.paper_task], or
  the paper's own files with
  [load_paper_files][pydvl_datainf.experiments.generative_tasks.load_paper_files]),
  its fine-tuning
  ([finetune_lora][pydvl_datainf.experiments.llm.finetune_lora] with
  [PAPER_FINETUNING][pydvl_datainf.experiments.llm.PAPER_FINETUNING]), the
  tokens a loss scores ([encode_scope][pydvl_datainf.experiments.llm.encode_scope])
  and its protocol ([run_paper_protocol][pydvl_datainf.experiments.influential.run_paper_protocol]);
* [pipelines][pydvl_datainf.experiments.pipelines]: fine-tune, then compare
  methods (used by the tutorials and the demo);
* [lds][pydvl_datainf.experiments.lds]: the linear datamodeling score, an
  attribution benchmark that retrains on random halves of the training set;
* [demo][pydvl_datainf.experiments.demo]: `python -m pydvl_datainf.demo`.
"""

from .generative_tasks import PAPER_TASKS, GenerativeTask, load_paper_files, paper_task
from .influential import run_paper_protocol
from .llm import (
    FULL_FINETUNING,
    GRADIENT_SCOPES,
    PAPER_FINETUNING,
    FineTuning,
    encode_scope,
    finetune_lora,
    load_smollm2,
    unload_lora,
)
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
    "FULL_FINETUNING",
    "FineTuning",
    "GRADIENT_SCOPES",
    "GenerativeTask",
    "PAPER_FINETUNING",
    "PAPER_TASKS",
    "encode_scope",
    "finetune_lora",
    "load_paper_files",
    "load_smollm2",
    "paper_task",
    "run_paper_protocol",
    "unload_lora",
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
