from deploy.entry import run

run()
