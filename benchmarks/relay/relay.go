// The seed design: accept, dial the backend, io.Copy each way (splice under the
// hood on Linux), CloseWrite when one direction ends. Written for the benchmark.
package main

import (
	"fmt"
	"io"
	"net"
	"os"
)

func pipe(dst, src *net.TCPConn, done chan<- struct{}) {
	io.Copy(dst, src)
	dst.CloseWrite()
	done <- struct{}{}
}

func serve(c *net.TCPConn, target string) {
	b, err := net.Dial("tcp", target)
	if err != nil {
		c.Close()
		return
	}
	bc := b.(*net.TCPConn)
	done := make(chan struct{}, 2)
	go pipe(bc, c, done)
	go pipe(c, bc, done)
	<-done
	<-done
	c.Close()
	bc.Close()
}

func main() {
	ln, err := net.Listen("tcp", os.Args[1])
	if err != nil {
		panic(err)
	}
	fmt.Println("ready")
	for {
		c, err := ln.Accept()
		if err != nil {
			continue
		}
		go serve(c.(*net.TCPConn), os.Args[2])
	}
}
