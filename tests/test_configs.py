"""Configs: every stage and preset constructs; overrides and errors name the field; validate() runs before compile."""

import pytest
from absl import flags
from ml_collections import config_flags

from configs import base
from tandem_jax.models import bundle
from tandem_jax.training.validate import ConfigError, validate


@pytest.mark.parametrize("stage", base.STAGES)
@pytest.mark.parametrize("preset", base.PRESETS)
def test_every_stage_and_preset_constructs(stage, preset):
  c = base.get_config(stage, preset)
  assert c.stage == stage and c.primary.vocab_size == c.data.vocab_size == c.secondary.vocab_size
  p, s, _ = bundle.model_configs(c)
  if preset != "tiny":
    assert s.num_params < p.num_params / 2
  if stage in ("primary", "secondary"):
    validate(c, num_devices=256 if preset == "v5e256" else 16 if preset == "v5e16" else 8)


def test_cpu_preset_sizes():
  c = base.get_config("tandem", "cpu")
  p, s, _ = bundle.model_configs(c)
  assert 3e6 < p.num_params < 10e6 and s.num_params < p.num_params / 2
  body = lambda m: m.num_params - m.vocab_size * m.d_model
  assert body(p) >= 6 * body(s)  # measured ~10x cheaper per decoded token on this CPU (ENVIRONMENT.md)


def test_unknown_preset_and_key():
  with pytest.raises(ValueError, match="preset"):
    base.get_config("primary", "huge")
  c = base.get_config("primary", "tiny")
  with pytest.raises((AttributeError, KeyError)):
    c.train.stepz = 3


def _parse(argv):
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file("config", flag_values=fv, lock_config=True, sys_argv=argv)
  fv(argv)
  return fv.config


def test_command_line_overrides():
  path = base.__file__.replace("base.py", "tandem.py")
  c = _parse(["prog", f"--config={path}:tiny", "--config.train.steps=7", "--config.tandem.layer_map=0,1"])
  assert c.train.steps == 7 and bundle.parse_layer_map(c.tandem.layer_map) == (0, 1)
  with pytest.raises(Exception, match="nosuchfield"):
    _parse(["prog", f"--config={path}:tiny", "--config.train.nosuchfield=1"])


def _bad(stage="primary", **changes):
  c = base.get_config(stage, "tiny")
  for key, value in changes.items():
    node = c
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return c


@pytest.mark.parametrize("changes,field", [
    ({"primary.vocab_size": 500}, "primary.vocab_size"),
    ({"train.batch_size": 12}, "train.batch_size"),  # 8 data shards
    ({"data.seq_len": 1000}, "data.seq_len"),
    ({"data.source": "web"}, "data.source"),
    ({"data.source": "text"}, "data.path"),
    ({"train.distil_lambda": 1.5}, "train.distil_lambda"),
    ({"mesh.shape": (3, 1)}, "mesh.shape"),
    ({"train.eval_batches": -1}, "train.eval_batches"),
    ({"train.eval_batches": 0, "train.eval_every": 5}, "train.eval_batches"),  # 0 = no evaluation at all
])
def test_errors_name_the_field(changes, field):
  with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
    validate(_bad(**changes), num_devices=8)


def test_tandem_errors(tmp_path):
  with pytest.raises(ConfigError, match="init.primary_workdir"):
    validate(base.get_config("tandem", "tiny"), num_devices=8)
  with pytest.raises(ConfigError, match="not a workdir"):
    validate(_bad("tandem", **{"init.primary_workdir": str(tmp_path)}), num_devices=8)
  with pytest.raises(ConfigError, match="layer_map"):
    validate(_bad("tandem", **{"tandem.layer_map": "0,9"}), num_devices=8, check_workdirs=False)
  with pytest.raises(ConfigError, match="secondary.vocab_size"):
    validate(_bad("tandem", **{"secondary.vocab_size": 400}), num_devices=8, check_workdirs=False)
  with pytest.raises(ConfigError, match="init.tandem_workdir"):
    validate(base.get_config("router", "tiny"), num_devices=8)


def test_continuing_a_tandem_keeps_its_coupling(tmp_path):
  """tandem_distil / router continue a tandem: a layer map or boundary other than the one it was trained with is an
  error naming both values (the checkpoint's weights would compute another function)."""
  import json
  from tandem_jax import workdir as workdir_lib
  src = base.get_config("tandem", "tiny")
  src.tandem.layer_map, src.tandem.boundary = "last", "eq2"
  (tmp_path / "tandem").mkdir()
  (tmp_path / "tandem" / "config.json").write_text(json.dumps(workdir_lib.config_dict(src)))
  for stage in ("tandem_distil", "router"):
    c = _bad(stage, **{"init.tandem_workdir": str(tmp_path / "tandem")})
    with pytest.raises(ConfigError, match=r"tandem\.layer_map: 'proportional' \(primary hidden states \(0, 1\)\) "
                                          r"differs from 'last' \(primary hidden states \(2, 2\)\)"):
      validate(c, num_devices=8)
    c.tandem.layer_map = "2,2"  # the same map spelled out is the same function
    with pytest.raises(ConfigError, match="tandem.boundary: 'fig1' differs from 'eq2'"):
      validate(c, num_devices=8)
    c.tandem.boundary = "eq2"
    validate(c, num_devices=8)
  # Resuming a tandem's own workdir with another coupling fails the same way, before anything is built.
  from tandem_jax.training import loop
  run = tmp_path / "run"
  (run / "checkpoints").mkdir(parents=True)
  (run / "config.json").write_text(json.dumps(workdir_lib.config_dict(base.get_config("tandem_distil", "tiny"))))
  c = _bad("tandem_distil", **{"init.tandem_workdir": str(tmp_path / "tandem")})
  c.tandem.layer_map, c.tandem.boundary = "last", "eq2"  # as its source tandem: validate() passes
  with pytest.raises(ConfigError, match="tandem.layer_map: 'last' .*the workdir being resumed"):
    loop.train(c, str(run))


@pytest.mark.parametrize("head_dim", [16, 64])
def test_pretrained_tandem_secondary_takes_the_primary_family(tmp_path, head_dim):
  """configs/pretrained_tandem.py: the secondary keeps its own sizes and takes the imported primary's vocabulary,
  positions and family switches (here Gemma 3's and Llama 3's); explicit RoPE divisors only at equal head size."""
  import json

  from configs import pretrained_tandem
  from tandem_jax.models.config import ARCHITECTURE_FIELDS, SIZE_FIELDS, TransformerConfig

  primary = TransformerConfig(
      vocab_size=300, d_model=64, num_layers=6, num_heads=4, num_kv_heads=1, head_dim=head_dim, d_ff=128,
      max_seq_len=96, rope_theta=1e6, norm_eps=1e-5, rope_scaling="llama3", rope_factor=8.0,
      rope_original_max_len=64, rope_freq_factors=tuple(1.0 + i for i in range(head_dim // 2)), qk_norm=True,
      query_pre_attn_scalar=48.0, attn_softcap=50.0, layer_types=("sliding",) * 5 + ("full",), sliding_window=8,
      rope_local_theta=1e4, mlp_activation="gelu_tanh", norm_plus_one=True, post_norms=True,
      scale_embeddings=True, final_softcap=30.0)
  (tmp_path / "config.json").write_text(json.dumps({"primary": primary.to_dict()}))
  c = pretrained_tandem.get_config(f"tiny,primary={tmp_path}")
  p, s, _ = bundle.model_configs(c)
  assert p == primary
  for k in ARCHITECTURE_FIELDS:
    want = () if k == "rope_freq_factors" and s.head_dim != primary.head_dim else getattr(primary, k)
    assert getattr(s, k) == want, k
  assert s.head_dim == 16 and s.num_layers == 1 and s.d_model == 32  # the tiny preset's own sizes
  assert any(getattr(s, k) != getattr(primary, k) for k in SIZE_FIELDS)
