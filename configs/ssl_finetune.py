"""Fine-tune (or linearly probe) a contrastive-pretrained encoder with few labels.

Step 2 of 2 after configs/ssl_pretrain.py (same model arguments on both sides):

  python -m busjax.main --config=configs/ssl_finetune.py --workdir=runs/ssl_finetune \\
      --config.init_from=runs/ssl_pretrain

`init_from` loads the pretraining run's encoder (``params/rest.encoder.<module>``, latest
checkpoint) into every module of the classifier but its head, which starts fresh; the optimiser
starts fresh too. Reports, CIs and checkpoints are the supervised regime's.

Arguments (comma-separated after `:`), combinable:
  smoke               seconds-long run (tests, CI).
  busi, cv, busbra    data and protocol, as in configs/supervised.py (configlib.apply_protocol);
                      64 px unless --config.data.image_size says otherwise (match the pretraining).
  labels=PCT          1 | 10 | 25 | 100 (default): the share of the train part's labelled images
                      kept, whole patients / near-duplicate groups per class, nested per seed
                      (--config.split.label_fraction_seed); val and test stay whole.
  probe               linear probe: only the head trains, the encoder (BatchNorm statistics too)
                      is frozen.
  scratch             no pretrained encoder: the from-scratch row of the same recipe.
  fusion=NAME         cross_attention (default) | concat | single; backbone=plain: as in
                      configs/ssl_pretrain.py (must match the pretraining run).
"""

from busjax import configlib

WHERE = "configs/ssl_finetune.py"
LABEL_PERCENTS = ("1", "10", "25", "100")


def get_config(arg=None):
  args = configlib.parse_arg(arg)
  known = {"smoke", "probe", "scratch", *configlib.PROTOCOL_ARGS}
  keyed = ("labels=", "fusion=", "backbone=")
  unknown = {a for a in args if a not in known and not a.startswith(keyed)}
  if unknown:
    raise ValueError(f"{WHERE}: unknown arguments {sorted(unknown)}; see the docstring")
  c = configlib.base_config()
  c.data = configlib.phantom_data(image_size=64)
  c.split.near_duplicates = False  # Phantom: no copies to find; patients are still grouped.
  configlib.apply_protocol(c, args)
  c.data.image_size = 64
  for name in c.external.keys():
    c.external[name].image_size = 64
  c.model = configlib.multiscale_model(args, where=WHERE)
  percent = configlib.choice(args, "labels", LABEL_PERCENTS, "100", where=WHERE)
  c.split.label_fraction = int(percent) / 100
  c.init_from_encoder = "scratch" not in args
  c.input.batch_size = 32
  c.train.epochs = 30
  c.train.min_steps = 300  # Few labels still get enough updates (10% of BUSI: ~200 epochs).
  c.train.ema_decay = 0.99
  c.train.eval_every = 50
  c.optim.lr = 5e-4  # Half the from-scratch rate: the encoder starts somewhere useful.
  if "probe" in args:
    c.train.trainable = "head"
    c.train.ema_decay = 0.0
    c.optim.lr = 1e-2
    c.optim.weight_decay = 0.0
  if "smoke" in args:
    configlib.apply_smoke(c)
    c.model.fusion_width = 32
  return c
