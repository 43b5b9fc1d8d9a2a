from homoexport.cli import app

app(prog_name="homoexport")
