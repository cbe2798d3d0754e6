# bench: the 13-byte hello as a Rack app, for unicorn
run lambda { |env| [200, {'content-type' => 'text/plain', 'content-length' => '13'}, ['Hello, World!']] }
