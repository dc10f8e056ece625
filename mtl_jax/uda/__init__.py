"""Multi-task unsupervised domain adaptation (DenseMTL's MTL-UDA, docs/models/densemtl.md).

A model is trained with labels on a source domain and without labels on a target domain, and
evaluated on the target. Output-level adversarial training: one spectral-normalised patch
discriminator per task and output scale (:mod:`mtl_jax.uda.discriminator`) learns to tell
source from target predictions; the model learns its supervised source losses plus
``lambda_adv`` times the BCE that makes the discriminators call its target predictions
"source". Both players are updated in one jitted, sharded step (:mod:`mtl_jax.uda.steps`);
the run (:mod:`mtl_jax.uda.run`, trained by the one loop of :mod:`mtl_jax.train`) reads the
two datasets with independent resumable iterators, checkpoints both players and evaluates on
the target and the source val splits.

``config.uda`` (its presence selects this kind of run in :func:`mtl_jax.train.build_run`)::

    adversarial=True       # False: source-only (or, with target labels, the oracle)
    lambda_adv=0.005
    scales=(0, 1)          # output scales seen by discriminators: 0 = the prediction,
                           # k = the model's side output k (aux '<task>/side/<k>')
    target_dataset=dict(name=..., config=..., options=...)  # unlabelled train + eval
    source_eval_dataset=None   # the source domain's eval data (default: config.dataset)
    discriminator=dict(channels=(64, 128, 256, 512), negative_slope=0.2, power_iterations=1)
    optimizer=dict(name='adam', learning_rate=1e-4, b1=0.9, b2=0.99, schedule='poly',
                   power=0.9)

``config.batch_size`` is the whole mixed batch: its first half source, its second half target
examples (DenseMTL: 2 + 2).
"""
