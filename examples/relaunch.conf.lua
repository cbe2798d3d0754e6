-- read by examples/relaunch.lua at start and on each SIGHUP
workers = 3
greeting = "Hello"
greetings = {}  -- per worker id, e.g. greetings = {[2] = "Bonjour"}
