"""Bad input fails at once with a message that says what is wrong (before Ray starts)."""

import dataclasses
import subprocess
import sys
import time

import pytest

from learners.cli import main
from learners.config import PRESETS, ConfigError, TrainConfig, preset


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_are_valid(name):
    preset(name).validate()


def test_paper_preset_matches_paper_md():
    cfg = preset("paper")
    assert (cfg.num_envs, cfg.num_steps, cfg.num_minibatches, cfg.update_epochs) == (64, 256, 8, 3)
    assert cfg.minibatch_size == 2048
    assert (cfg.learning_rate, cfg.adam_eps, cfg.gamma, cfg.gae_lambda) == (5e-4, 1e-5, 0.999, 0.95)
    assert (cfg.clip_coef, cfg.vf_coef, cfg.ent_coef, cfg.alpha, cfg.max_grad_norm) == (0.2, 0.5, 0.01, 1.0, 0.5)
    assert (cfg.num_levels, cfg.start_level, cfg.distribution_mode, cfg.clip_reward) == (500, 0, "hard", 10.0)


@pytest.mark.parametrize("changes,fragment", [
    (dict(env_id="coinrn"), "coinrun"),
    (dict(env_id="CartPol-v1"), "CartPole-v1"),
    (dict(env_id="bigfish", distribution_mode="memory"), "easy"),
    (dict(num_envs=0), "--num-envs must be a positive integer"),
    (dict(num_steps=-3), "--num-steps must be a positive integer"),
    (dict(num_envs=64, num_steps=256, num_minibatches=7), "not divisible by --num-minibatches 7"),
    (dict(alpha=-1.0), "--alpha must be >= 0"),
    (dict(alpha=float("nan")), "--alpha must be >= 0"),
    (dict(num_envs=10, num_actors=3), "divisible by --num-actors 3"),
    (dict(distill_mode="joint"), "--distill-mode must be one of detached, exact"),
    (dict(sync="often"), "--sync must be one of"),
    (dict(sync="0"), "--sync must be one of"),
    (dict(distill_mode="exact", sync="epoch"), "needs --sync minibatch"),
    (dict(gamma=1.5), "--gamma"),
    (dict(device="tpu"), "--device"),
])
def test_validation_messages(changes, fragment):
    with pytest.raises(ConfigError, match=None) as err:
        dataclasses.replace(TrainConfig(), **changes).validate()
    assert fragment in str(err.value)


def test_exact_mode_allowed_without_distillation_for_any_schedule():
    dataclasses.replace(TrainConfig(), distill_mode="exact", sync="epoch", alpha=0.0).validate()


def test_iterations_round_up_to_whole_batches():
    cfg = dataclasses.replace(TrainConfig(), num_envs=8, num_steps=16, total_steps=300)
    assert cfg.num_iterations == 3


def test_config_round_trip(tmp_path):
    cfg = preset("smoke")
    cfg.save(tmp_path / "config.json")
    assert TrainConfig.load(tmp_path / "config.json") == cfg
    (tmp_path / "bad.json").write_text('{"env_id": "coinrun", "learning_rat": 1}')
    with pytest.raises(ConfigError, match="learning_rat"):
        TrainConfig.load(tmp_path / "bad.json")


@pytest.mark.parametrize("argv,fragment", [
    (["train", "--env", "notagame"], "notagame"),
    (["train", "--preset", "smoke", "--num-minibatches", "3"], "not divisible"),
    (["train", "--resume", "/nonexistent/run"], "no config.json"),
    (["train", "--backend", "dask"], "--backend must be one of ray, local"),
    (["train", "--backend", "local", "--ray-address", "auto"], "drop --ray-address, or use --backend ray"),
    (["train", "--backend", "local", "--inference", "learner"], "use --inference actor (or auto), or --backend ray"),
    (["train", "--backend", "local", "--device", "cuda"], "use --device cpu (or auto), or --backend ray"),
])
def test_cli_fails_fast_with_exit_code_2(argv, fragment, capsys):
    start = time.perf_counter()
    assert main(argv) == 2
    assert fragment in capsys.readouterr().err
    assert time.perf_counter() - start < 30   # no Ray, no env rollout


def test_cli_rejects_bad_flag_types():
    proc = subprocess.run([sys.executable, "-m", "learners.cli", "train", "--alpha", "lots"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "--alpha" in proc.stderr and "invalid float value" in proc.stderr


def test_unreachable_ray_address_fails_fast(capsys):
    start = time.perf_counter()
    assert main(["train", "--preset", "cartpole", "--ray-address", "127.0.0.1:9"]) == 2
    assert "nothing answers at 127.0.0.1:9" in capsys.readouterr().err
    assert time.perf_counter() - start < 30


def test_grpc_port_in_use_fails_fast(capsys):
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(["train", "--preset", "cartpole", "--grpc-port", str(port)]) == 2
    assert f"port {port} on 127.0.0.1 is in use" in capsys.readouterr().err


def test_the_readme_lists_exactly_what_a_resume_may_change():
    import re
    from pathlib import Path

    from learners.config import RESUME_MAY_CHANGE

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    listed = re.search(r"`--resume RUN_DIR` \(may change only (.*?)\)\.", readme, re.S)
    assert listed, "the README's list of what --resume may change is gone"
    flags = set(re.findall(r"`--([a-z0-9-]+)`", listed.group(1)))
    assert flags == {name.replace("_", "-") for name in RESUME_MAY_CHANGE}


def test_help_shows_each_default_once():
    """Config flags say their TrainConfig default; argparse must not add a misleading `(default: None)` beside it."""
    import re

    from learners.cli import build_parser

    parser = build_parser()
    helps = {command: " ".join(parser._subparsers._group_actions[0].choices[command].format_help().split())
             for command in ("train", "sweep")}
    assert all("(default: None)" not in text for text in helps.values())
    env = re.search(r"--env ID, --env-id ID (.*?)--distribution-mode", helps["train"]).group(1)
    assert env.count("default") == 1 and "(default 'coinrun')" in env, env
    assert "--print-config print the resolved config" in helps["train"] and "(default: False)" in helps["train"]


def test_every_form_of_a_bool_flag_parses_and_a_flag_not_given_is_told_apart():
    """What the CLI keeps (learners/cli.py, _add_config_flags): `--flag`, `--no-flag`, `--flag true|false` (what
    `mdpo sweep` writes), and None for a flag not given, even where a given one equals its default."""
    from learners.cli import build_parser

    parser = build_parser()
    base = ["train", "--preset", "cartpole"]
    assert parser.parse_args(base + ["--policy-lag"]).policy_lag is True
    assert parser.parse_args(base + ["--no-policy-lag"]).policy_lag is False
    assert parser.parse_args(base + ["--policy-lag", "true"]).policy_lag is True
    assert parser.parse_args(base + ["--policy-lag", "false"]).policy_lag is False
    assert parser.parse_args(base).policy_lag is None
    assert parser.parse_args(base + ["--alpha", str(TrainConfig.alpha)]).alpha == TrainConfig.alpha
    assert parser.parse_args(base).alpha is None
