# bench: unicorn with WORKERS workers (default 2)
worker_processes Integer(ENV['WORKERS'] || 2)
preload_app true
