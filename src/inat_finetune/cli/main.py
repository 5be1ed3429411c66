"""The ``inat-finetune`` command line assembled: the group (app.py) and every command, in the
order ``--help`` lists them. The commands live by family in run_commands.py (train, compare,
demo, sweep), data_commands.py (download, prepare, check-data, show) and model_commands.py
(evaluate, predict, export, serve, report, models).
"""

from __future__ import annotations

from inat_finetune.cli import data_commands, model_commands, run_commands
from inat_finetune.cli.app import app

app.command()(run_commands.train)
app.command()(run_commands.compare)
app.command()(data_commands.prepare)
app.command()(model_commands.evaluate)
app.command("models")(model_commands.list_backbones)
app.command()(run_commands.demo)
app.command()(data_commands.download)
app.command("check-data")(data_commands.check_data_command)
app.command()(data_commands.show)
app.command("report")(model_commands.report_command)
app.command()(model_commands.predict)
app.command("export")(model_commands.export_model)
app.command()(model_commands.serve)
app.command()(run_commands.sweep)

__all__ = ["app"]
