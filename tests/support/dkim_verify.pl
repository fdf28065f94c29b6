#!/usr/bin/perl
# Verify the DKIM signatures of the message on stdin with Mail::DKIM, an
# implementation independent of dkimpy, answering DNS from the command line:
#
#   dkim_verify.pl 's1._domainkey.example.com=v=DKIM1; k=rsa; p=...' ... < message
#
# Prints one line per signature, "RESULT a=ALGORITHM d=DOMAIN s=SELECTOR DETAIL",
# then "overall RESULT". Names not given answer NXDOMAIN.
use strict;
use warnings;

BEGIN {
    eval { require Mail::DKIM::Verifier; require Net::DNS; 1 }
      or die "Mail::DKIM is missing (Debian: apt-get install libmail-dkim-perl): $@";
}

my %records;
for my $arg (@ARGV) {
    my ( $name, $txt ) = split /=/, $arg, 2;
    defined $txt or die "argument '$arg' is not NAME=TXT\n";
    $records{ lc $name } = $txt;
}

# Mail::DKIM::DNS::query calls $RESOLVER->send($name, $type) and reads the
# reply's rcode and answer section; this stands in for Net::DNS::Resolver.
package FakeResolver {
    sub new { my ( $class, $records ) = @_; return bless { records => $records }, $class }
    sub errorstring { return 'NOERROR' }

    sub send {
        my ( $self, $name, $type ) = @_;
        my $reply = Net::DNS::Packet->new( $name, $type );
        $reply->header->qr(1);
        my $txt = $self->{records}{ lc $name };
        if ( !defined $txt ) {
            $reply->header->rcode('NXDOMAIN');
            return $reply;
        }
        my @strings = unpack '(a255)*', $txt;
        $reply->push( answer => Net::DNS::RR->new( name => $name, type => 'TXT', txtdata => [@strings] ) );
        return $reply;
    }
}

$Mail::DKIM::DNS::RESOLVER = FakeResolver->new( \%records );

binmode STDIN;
my $verifier = Mail::DKIM::Verifier->new();
while ( my $line = <STDIN> ) {
    $line =~ s/\r?\n\z/\015\012/;
    $verifier->PRINT($line);
}
$verifier->CLOSE();

for my $sig ( $verifier->signatures ) {
    my $detail = $sig->result_detail;
    printf "%s a=%s d=%s s=%s %s\n", $sig->result, $sig->algorithm, $sig->domain, $sig->selector,
      $detail;
}
printf "overall %s\n", $verifier->result;
