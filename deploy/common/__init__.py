"""What every layer of deploy may use: the errors a user can act on (with their exit codes),
atomic artifact writes, a measured figure or the reason it is missing, and the machine facts a
latency needs. Imports nothing else from deploy."""
