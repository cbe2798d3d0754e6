#!/usr/bin/perl
# bench: the POE pre-forking HTTP server of seed 002 with its knobs set
# for the benchmark: port and process count from the command line, DEBUG
# and TESTING_CHURN off, bound to 127.0.0.1, and the 13-byte hello as the
# answer (the seed's page of headers would cost more than the peers').
use warnings;
use strict;

use constant DEBUG         => 0;
use constant MAX_PROCESSES => ($ARGV[1] || 2);
use constant SERVER_PORT   => ($ARGV[0] || 8888);
use constant TESTING_CHURN => 0;

use POE;
use POE::Filter::HTTPD;
use POE::Wheel::ReadWrite;
use POE::Wheel::SocketFactory;

POE::Session->create(
  inline_states => {
    _start         => \&listener_start,
    _stop          => \&listener_stop,
    do_fork        => \&listener_do_fork,
    got_error      => \&listener_got_error,
    got_sig_int    => \&listener_got_sig_int,
    got_sig_child  => \&listener_got_sig_child,
    got_connection => \&listener_got_connection,
    _child         => sub { undef },
  },
  heap => {max_processes => MAX_PROCESSES},
);
POE::Kernel->run();
exit;

sub listener_start {
  my ($kernel, $heap) = @_[KERNEL, HEAP];
  $heap->{server} = POE::Wheel::SocketFactory->new(
    BindAddress  => "127.0.0.1",
    BindPort     => SERVER_PORT,
    SuccessEvent => "got_connection",
    FailureEvent => "got_error",
    Reuse        => "yes",
  );
  $kernel->sig(INT => "got_sig_int");
  $heap->{children}   = {};
  $heap->{is_a_child} = 0;
  warn "Server $$ has begun listening on port ", SERVER_PORT, "\n";
  $kernel->yield("do_fork");
}

sub listener_stop {
  DEBUG and warn "Server $$ stopped.\n";
}

sub listener_got_error {
  my ($heap, $syscall, $errno, $error) = @_[HEAP, ARG0 .. ARG2];
  DEBUG and warn("Server $$ got $syscall error $errno: $error\n");
  delete $heap->{server};
}

sub listener_do_fork {
  my ($kernel, $heap) = @_[KERNEL, HEAP];
  return if $heap->{is_a_child};
  while (scalar(keys %{$heap->{children}}) < $heap->{max_processes}) {
    my $pid = fork();
    unless (defined($pid)) {
      DEBUG and warn "Server $$ fork failed: $!\n";
      $kernel->delay(do_fork => 1);
      return;
    }
    if ($pid) {
      $heap->{children}->{$pid} = 1;
      $kernel->sig_child($pid, "got_sig_child");
      next;
    }
    $kernel->has_forked();
    $heap->{is_a_child} = 1;
    $heap->{children}   = {};
    return;
  }
}

sub listener_got_sig_int {
  delete $_[HEAP]->{server};
  $_[KERNEL]->sig_handled();
}

sub listener_got_sig_child {
  my ($kernel, $heap, $child_pid) = @_[KERNEL, HEAP, ARG1];
  return unless delete $heap->{children}->{$child_pid};
  $kernel->yield("do_fork") if exists $_[HEAP]->{server};
}

sub listener_got_connection {
  my ($heap, $socket, $peer_addr, $peer_port) = @_[HEAP, ARG0, ARG1, ARG2];
  POE::Session->create(
    inline_states => {
      _start     => \&interactor_start,
      _stop      => \&interactor_stop,
      got_request => \&interactor_got_request,
      got_flush  => \&interactor_flushed_request,
      got_error  => \&interactor_got_error,
      _parent    => sub { 0 },
    },
    heap => {socket => $socket, peer_addr => $peer_addr, peer_port => $peer_port},
  );
  delete $heap->{server}
    if (TESTING_CHURN and $heap->{is_a_child} and (rand() < 0.25));
}

sub interactor_start {
  my $heap = $_[HEAP];
  $heap->{client} = POE::Wheel::ReadWrite->new(
    Handle       => $heap->{socket},
    Filter       => POE::Filter::HTTPD->new(),
    InputEvent   => "got_request",
    ErrorEvent   => "got_error",
    FlushedEvent => "got_flush",
  );
}

sub interactor_stop { }

sub interactor_got_request {
  my ($heap, $request) = @_[HEAP, ARG0];
  if ($request->isa("HTTP::Response")) {
    $heap->{client}->put($request);
    return;
  }
  my $response = HTTP::Response->new(200);
  $response->content_type("text/plain");
  $response->content("Hello, World!");
  $response->content_length(13);
  $heap->{client}->put($response);
}

sub interactor_got_error {
  delete $_[HEAP]->{client};
}

sub interactor_flushed_request {
  delete $_[HEAP]->{client};
}
