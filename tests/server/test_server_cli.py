"""`meterline --version`, `keys create/list/revoke`, and --config after the subcommand."""

from __future__ import annotations

from pathlib import Path

from server_proc import meterline


def test_version() -> None:
    out = meterline("--version")
    assert out.returncode == 0 and out.stdout.startswith("meterline ")


def test_keys_lifecycle_and_config_after_subcommand(tmp_path: Path) -> None:
    keys_file = tmp_path / "k" / "keys.db"
    config = tmp_path / "m.toml"
    config.write_text(f'[server]\nkeys_file = "{keys_file}"\n')
    created = meterline("keys", "create", "--tenant", "acme", "--scope", "read",
                        "--scope", "ingest", "--name", "ci", "--config", str(config))
    assert created.returncode == 0, created.stderr
    key = created.stdout.strip()
    assert key.startswith("ml_") and keys_file.exists()  # the config after the subcommand
    key_id = key.split("_")[1]
    listed = meterline("--config", str(config), "keys", "list")  # ... and before it
    assert key_id in listed.stdout and "read,ingest" in listed.stdout
    assert key not in listed.stdout and key.split("_", 2)[2] not in listed.stdout
    assert meterline("keys", "revoke", key_id, "--config", str(config)).returncode == 0
    assert "revoked" in meterline("keys", "list", "--config", str(config)).stdout
    again = meterline("keys", "revoke", key_id, "--config", str(config))
    assert again.returncode == 2 and "no active key" in again.stderr
    bad = meterline("keys", "create", "--tenant", "No:Colons", "--scope", "read",
                    "--config", str(config))
    assert bad.returncode == 2 and "tenant must match" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_bad_server_section_reports_every_error(tmp_path: Path) -> None:
    config = tmp_path / "m.toml"
    config.write_text('[server]\nport = "x"\npipeline = "cloud"\nbogus = 1\n'
                      'anomalies = "yes"\nanomaly_settings = 3\nraw_insert_interval_ms = -1\n'
                      '[[server.quotas]]\nmeter = "nope"\nlimit = 0.1\n')
    out = meterline("serve", "--config", str(config))
    assert out.returncode == 2
    for needle in ("port must be", "pipeline must be", "unknown key 'bogus'",
                   "anomalies must be true or false", "anomaly_settings must be a path",
                   "meter 'nope'", "limit 0.1", "raw_insert_interval_ms must be an int"):
        assert needle in out.stderr, out.stderr


def test_a_bad_anomaly_settings_file_stops_serve_before_it_listens(tmp_path: Path) -> None:
    settings = tmp_path / "anomalies.toml"
    settings.write_text("[detectr]\n")
    config = tmp_path / "m.toml"
    config.write_text(f'[storage]\ndata_dir = "{tmp_path / "chdb"}"\n'
                      f'[server]\nport = 0\nanomaly_settings = "{settings}"\n')
    out = meterline("serve", "--config", str(config))
    assert out.returncode == 2, out.stdout + out.stderr
    assert "unknown section [detectr]" in out.stderr and "listening" not in out.stdout
