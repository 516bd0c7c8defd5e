from qat_deploy.deploy.entry import run

run()
