#!/usr/bin/env lua5.4
-- examples/systemd/app.lua: the app of app.service, ready for production:
-- the socket from systemd, the status endpoint, the workers as a user of
-- their own, timeouts and recycling; every option here has a README entry.
local prefork = require "prefork"

prefork.start{
  listen = "systemd:web",                  -- app.socket's FileDescriptorName
  status = "unix:/run/app/status.sock",    -- GET / (JSON), GET /metrics
  user = "www-data",                       -- the workers' user (the master is root)
  log = "/var/log/app/app.log",            -- USR1 reopens it (logrotate)
  pid_file = "/run/app/app.pid",
  timeout = 30, max_requests = 10000, max_requests_jitter = 1000,
  fork = function (worker)
    worker:serve(function (conn)
      local first = true
      while true do
        local line = conn:read("l")
        if not line then return end
        if line == "" or line == "\r" then  -- the end of a request's headers
          if not first then worker:count() end  -- (the connection counted one)
          first = false
          local close = worker:stopping()  -- a graceful stop: the last answer
          local ok = conn:write("HTTP/1.1 200 OK\r\nContent-Length: 3\r\n",
                                close and "Connection: close\r\n" or "", "\r\nok\n")
          if not ok or close then return end
        end
      end
    end)
  end,
}
