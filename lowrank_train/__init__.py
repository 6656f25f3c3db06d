"""The training library under train.py, one job per module (docs/design.md §2):

    config        TrainConfig: every option, checked; its autocast
    cli           the command line: options → TrainConfig, --resume, the run folder
    distributed   the process group (a context manager), reductions over processes, sharded gathers
    data          splits, batches, the seeded epoch order, per-sample draws
    loop          fit (AdamW + warm-up/cosine, signals, non-finite steps) and the stages a method runs
    checkpoint    trainable tensors, resume points, RNG state, the trained-tensor file
    evaluate      predictions and every missing-modality protocol
    report        results.md / results.json / cost.json, plots, the accuracy table of one or more runs
    stage1        the unimodal models, trained or probed once and cached

Methods (what trains, their losses and gradient hooks) are in lowrank_methods, above this package.
"""
