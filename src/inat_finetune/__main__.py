from inat_finetune.cli.main import app

app(prog_name="inat-finetune")
