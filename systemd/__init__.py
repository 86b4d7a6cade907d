"""The system files (units, D-Bus, polkit) shipped as package data (autoglm_tune.systemd); see tuner/cli_system.py."""
