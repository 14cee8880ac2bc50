"""Training machinery shared by ``npmask.train``, ``npmask.pretrain`` and ``npmask.compare``.

One concept per module:

- :mod:`.config`      the settings of a run (``config.json``) and the library versions
- :mod:`.suites`      synthetic / decathlon / folder: data, network, domains, Emax defaults
- :mod:`.batches`     a domain folder -> training and test batch iterators
- :mod:`.loop`        one training epoch, one evaluation pass (NaN-checked, tqdm bars)
- :mod:`.fit`         the epoch loop with a checkpoint after every epoch and exact resume
- :mod:`.domain_training`  the target domains of a run, one after the other, then the scores
- :mod:`.domain_workers`   the same domains side by side, one process each
- :mod:`.pretraining` a backbone trained from scratch on one domain
- :mod:`.checkpoint`  atomic ``.npz`` checkpoints of nested state
- :mod:`.run_folder`  the files a run leaves behind, metrics.jsonl
- :mod:`.results`     scores and the markdown results table
- :mod:`.plots`       learning curves
- :mod:`.cli`         argparse plumbing and the flags of ``npmask.train`` (shared with compare);
  :mod:`.errors` one-line error reporting
"""
