"""Multimodal mammography + ultrasound (after Yan et al., MPM-MU): attention branches + stacking.

Stage 1 trains an ultrasound branch (ResNet-18, width 0.5, ECA attention) and a mammography
branch (the same with CBAM) on their own modality; stage 2 stacks logistic regression, an SVM, a
random forest and extra-trees under an MLP on the patients' fused branch features. With no
arguments it runs on the embedded paired phantoms (300 benign, 150 malignant synthetic patients,
one or two ultrasound images and a CC + MLO mammogram each; we know of no public paired
mammography + ultrasound set):

  python -m busjax.main --config=configs/multimodal.py --workdir=runs/multimodal

The report is per patient (reports/, marked SYNTHETIC), each branch's run is under
branch_us/ and branch_mammo/, the fitted stack in stack.skops (skops, no pickle).

Arguments (comma-separated after `:`), combinable:
  smoke               seconds-long run (tests, CI).
  modality=NAME       both (default) | us | mammo: one modality alone.
  attention=none      branches without their attention blocks (fusion without attention).
  learner=NAME        stack (default) | lr | svm | rf | et: one base learner alone.
  fusion=end_to_end   the same two branch networks under one linear head, trained jointly
                      (busjax/models/multimodal.py) instead of frozen branches + stack.
  csv                 a paired manifest (--config.data.root=pairs.csv: patient_id,us_path,
                      mammo_path,label[,split]); its split column is used when present
                      (--config.split.kind=predefined).
The phantom's shared/complementary signal: --config.data.paired.shared=0.2 (each mass's shape
and margin copied from the ultrasound lesion with that probability; see
busjax/data/mammo_phantom.py).
"""

import ml_collections

from busjax import configlib

WHERE = "configs/multimodal.py"


def _branch_model(attention: str) -> ml_collections.ConfigDict:
  model = configlib.base_config().model  # ResNet-18, width 0.5, one grey channel.
  model.attention = attention
  model.attention_reduction = 8
  return model


def get_config(arg=None):
  args = configlib.parse_arg(arg)
  known = {"smoke", "csv"}
  keyed = ("modality=", "attention=", "learner=", "fusion=")
  unknown = {a for a in args if a not in known and not a.startswith(keyed)}
  if unknown:
    raise ValueError(f"{WHERE}: unknown arguments {sorted(unknown)}; see the docstring")
  c = configlib.base_config()
  c.trainer = "multimodal"
  c.data = ml_collections.ConfigDict(
    dict(
      source="paired_phantom",
      root=configlib.optional_path(),
      classes="binary",
      image_size=64,
      on_error="raise",
      split_file=configlib.optional_path(),
      missing_partner="raise",
      paired=dict(
        counts=(300, 150), seed=0, shared=0.5, difficulty=0.2, us_images_per_patient=(1, 2)
      ),
    )
  )
  if "csv" in args:
    c.data.source = "paired_csv"
  c.split.near_duplicates = False  # Patients are the unit; phantoms have no copies.
  modality = configlib.choice(args, "modality", ("both", "us", "mammo"), "both", where=WHERE)
  no_attention = configlib.choice(args, "attention", ("none",), "", where=WHERE) == "none"
  c.multimodal = ml_collections.ConfigDict(
    dict(
      modalities=("us", "mammo") if modality == "both" else (modality,),
      us=dict(model=_branch_model("none" if no_attention else "eca")),
      mammo=dict(model=_branch_model("none" if no_attention else "cbam")),
      learner=configlib.choice(
        args, "learner", ("stack", "lr", "svm", "rf", "et"), "stack", where=WHERE
      ),
      fusion=configlib.choice(
        args, "fusion", ("two_stage", "end_to_end"), "two_stage", where=WHERE
      ),
      end_to_end_dropout=0.2,
      normalization="per_modality",
      stack_cv=5,
      # Where branch_us/ and branch_mammo/ live (default: the workdir). Point stage-2 ablations
      # at one finished run's folder to reuse its branches instead of retraining them.
      branches_dir=configlib.optional_path(),
    )
  )
  c.input.batch_size = 32
  c.train.epochs = 20
  c.train.ema_decay = 0.99
  c.train.eval_every = 100
  if "smoke" in args:
    configlib.apply_smoke(c)
    c.data.paired.counts = (16, 12)
    c.multimodal.stack_cv = 3
    for branch in ("us", "mammo"):
      c.multimodal[branch].model.width = 0.25
  return c
