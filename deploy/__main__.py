from qat_deploy.deploy.app.entry import run

run()
