from inat_finetune.cli import app

app(prog_name="inat-finetune")
