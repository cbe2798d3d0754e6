# bench: the hello Rack app, but GET /hang loops for ever (the hang case)
run lambda { |env|
  loop { } if env['PATH_INFO'] == '/hang'
  [200, {'content-type' => 'text/plain', 'content-length' => '13'}, ['Hello, World!']]
}
