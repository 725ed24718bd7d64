// Launcher for govmomi's vSphere simulator, built by `cargo xtask setup` from Debian's
// golang-github-vmware-govmomi-dev sources (which ship the simulator package, not a command).
// It takes the flags the conformance tests pass, prints the `export GOVC_URL=... GOVC_SIM_PID=...`
// line the test kit reads, and on SIGTERM or SIGINT removes its inventory and exits 0.
package main

import (
	"crypto/tls"
	"flag"
	"fmt"
	"log"
	"net/url"
	"os"
	"os/signal"
	"syscall"

	"github.com/vmware/govmomi/simulator"
)

func main() {
	listen := flag.String("l", "127.0.0.1:8989", "address to listen on (port 0: a free one)")
	cert := flag.String("tlscert", "", "PEM certificate to serve (default: the simulator's own)")
	key := flag.String("tlskey", "", "PEM key of -tlscert")
	useTLS := flag.Bool("tls", true, "serve HTTPS")
	user := flag.String("username", "", "the only user name Login accepts (default: any)")
	pass := flag.String("password", "", "its password")
	esx := flag.Bool("esx", false, "a standalone ESXi host instead of a vCenter")
	vms := flag.Int("vm", -1, "VMs per host and per resource pool (default: the model's)")
	hosts := flag.Int("host", -1, "hosts per cluster (default: the model's)")
	flag.Parse()

	model := simulator.VPX()
	if *esx {
		model = simulator.ESX()
	}
	if *vms >= 0 {
		model.Machine = *vms
	}
	if *hosts >= 0 && !*esx {
		model.ClusterHost = *hosts
	}
	if err := model.Create(); err != nil {
		log.Fatalf("vcsim: creating the inventory: %v", err)
	}
	// Login checks the listen URL's credentials; without them it accepts anyone.
	model.Service.Listen = &url.URL{Host: *listen}
	if *user != "" {
		model.Service.Listen.User = url.UserPassword(*user, *pass)
	}
	if *useTLS {
		model.Service.TLS = new(tls.Config)
		if *cert != "" {
			pair, err := tls.LoadX509KeyPair(*cert, *key)
			if err != nil {
				log.Fatalf("vcsim: loading -tlscert/-tlskey: %v", err)
			}
			model.Service.TLS.Certificates = []tls.Certificate{pair}
		}
	}
	server := model.Service.NewServer()

	fmt.Printf("export GOVC_URL=%s GOVC_SIM_PID=%d\n", server.URL.String(), os.Getpid())

	stop := make(chan os.Signal, 1)
	signal.Notify(stop, syscall.SIGTERM, syscall.SIGINT)
	<-stop
	server.Close()
	model.Remove()
}
